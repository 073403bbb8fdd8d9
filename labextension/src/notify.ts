/**
 * Notifications before a kernel's lease ends, at its warning marks (the marks its watchdog warns
 * at: a kernelspec's `warn_before` and a minute, or 10 minutes and 1 minute for `%chronos`
 * leases), each with an "Extend 30m" action, and one when it ends, saying how. Only leases held by
 * kernels of this server are followed: magic and provisioner kernels alike.
 */
import { Notification } from '@jupyterlab/apputils';
import { ILease, IStatus } from './api';
import { devicesText, formatClock, formatDuration, leaseName, remainingOf } from './format';
import { StatusModel } from './model';

export interface INotifierActions {
  extend(lease: ILease): Promise<void>;
  extendLabel(): string;
  enabled(): boolean;
}

interface IFollowed {
  lease: ILease;
  kernelPath: string | null;
  ownKernel: boolean;
  /** What happens to the kernel at the lease's end (the provisioner's policy, or the machine's). */
  onExpiry: string;
  passed: Set<number>;
  toasts: Map<number, string>;
}

const ENDED_WORDS: { [state: string]: string } = {
  expired: 'has expired',
  released: 'was released',
  revoked: 'has ended: its kernel exited',
  withdrawn: 'was withdrawn from the queue'
};

const STOPS = ['terminate', 'kill'];

export class LeaseNotifier {
  private _followed = new Map<string, IFollowed>();
  private _quiet = new Set<string>();

  constructor(
    private readonly _model: StatusModel,
    private readonly _actions: INotifierActions
  ) {
    this._model.changed.connect(this._read, this);
    this._model.ticked.connect(this._check, this);
  }

  /** Leases released from this page: their end needs no notification. */
  quiet(leaseId: string): void {
    this._quiet.add(leaseId);
  }

  private _read(_: StatusModel, status: IStatus | null): void {
    if (!status) {
      return;
    }
    const held = new Map<string, { path: string | null; own: boolean; onExpiry: string }>();
    for (const kernel of status.kernels) {
      for (const id of kernel.lease_ids) {
        const own = kernel.own_lease_id === id;
        held.set(id, { path: kernel.path, own, onExpiry: (own && kernel.on_expiry) || status.on_expiry });
      }
    }
    for (const lease of status.leases) {
      const where = held.get(lease.id);
      if (lease.state !== 'active' || !where) {
        continue;
      }
      const known = this._followed.get(lease.id);
      if (known) {
        known.lease = lease;
      } else {
        const followed: IFollowed = {
          lease, kernelPath: where.path, ownKernel: where.own, onExpiry: where.onExpiry, passed: new Set(),
          toasts: new Map()
        };
        this._firstSight(followed);
        this._followed.set(lease.id, followed);
      }
    }
    for (const [id, followed] of Array.from(this._followed)) {
      if (status.leases.some(l => l.id === id && l.state === 'active')) {
        continue;
      }
      this._followed.delete(id);
      for (const toast of followed.toasts.values()) {
        Notification.dismiss(toast);
      }
      const ended = status.ended.find(l => l.id === id);
      if (ended && !this._quiet.has(id) && this._actions.enabled()) {
        this._ended(ended, followed);
      }
    }
    this._check();
  }

  /** Marks already behind a lease when it is first seen are not announced, except the nearest one
   * of a lease that was longer than it (a page opened late still hears that its lease is ending). */
  private _firstSight(followed: IFollowed): void {
    const remaining = remainingOf(followed.lease, this._model.clock);
    const behind = followed.lease.warn_at.filter(mark => remaining <= mark).sort((a, b) => a - b);
    for (const mark of behind) {
      followed.passed.add(mark);
    }
    const nearest = behind[0];
    if (nearest !== undefined && followed.lease.duration_s > nearest + 1) {
      followed.passed.delete(nearest);
    }
  }

  private _check(): void {
    const clock = this._model.clock;
    for (const followed of this._followed.values()) {
      const remaining = remainingOf(followed.lease, clock);
      if (remaining <= 0) {
        continue;
      }
      for (const mark of followed.lease.warn_at) {
        if (remaining > mark + 1) {
          // Extended past the mark again: it may be announced again later.
          followed.passed.delete(mark);
          const toast = followed.toasts.get(mark);
          if (toast) {
            Notification.dismiss(toast);
            followed.toasts.delete(mark);
          }
        } else if (!followed.passed.has(mark)) {
          followed.passed.add(mark);
          if (this._actions.enabled()) {
            this._warn(followed, remaining, mark);
          }
        }
      }
    }
  }

  private _warn(followed: IFollowed, remaining: number, mark: number): void {
    const lease = followed.lease;
    const ends = lease.expires_at !== null ? ` (${formatClock(this._model.clock.toLocalMs(lease.expires_at))})` : '';
    const after = STOPS.includes(followed.onExpiry) ? '; its kernel stops then' : '';
    // Jupyter truncates a notification past 140 characters: keep the words that matter first.
    const message = `Chronos ${leaseName(lease)} on ${devicesText(lease.devices)} ends in ${formatDuration(remaining)}${ends}${after}.`;
    const id = Notification.warning(message, {
      autoClose: false,
      actions: [
        {
          label: this._actions.extendLabel(),
          caption: `Add ${this._actions.extendLabel().replace(/^Extend /, '')} to lease ${lease.id}`,
          displayType: 'accent',
          callback: () => void this._actions.extend(lease)
        }
      ]
    });
    followed.toasts.set(mark, id);
  }

  private _ended(lease: ILease, followed: IFollowed): void {
    const how = ENDED_WORDS[lease.state] ?? `ended (${lease.state})`;
    // A kernel's own lease ends its kernel by its policy, however it ends; a %chronos lease only
    // at its end (released, its kernel is left alone).
    const policy = followed.ownKernel || lease.state === 'expired' ? followed.onExpiry : 'warn';
    const next =
      lease.state === 'revoked'
        ? '; a new kernel takes a new lease.'
        : STOPS.includes(policy)
          ? ': its kernel was stopped; start a new one for a new lease.'
          : policy === 'interrupt'
            ? ': the running cell was interrupted; the kernel runs on without a GPU lease.'
            : '; the kernel runs on without a GPU lease.';
    Notification.error(`Chronos ${leaseName(lease)} ${how}${next}`, { autoClose: false });
  }
}
