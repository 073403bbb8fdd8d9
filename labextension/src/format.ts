/**
 * Words and numbers as Chronos writes them (the same spellings as chronos.units on the server).
 */
import { IKernel, ILease, IStatus } from './api';

const GIB = 1024 ** 3;
const MIB = 1024 ** 2;

/** Under this many seconds left a lease shows amber; under CRITICAL_S, red (as the widget does). */
export const WARNING_S = 600;
export const CRITICAL_S = 60;

/** `4320` -> `1h 12m`; seconds are shown only under ten minutes (chronos.units.format_duration). */
export function formatDuration(seconds: number): string {
  let rest = Math.max(0, Math.round(seconds));
  const days = Math.floor(rest / 86400);
  rest -= days * 86400;
  const hours = Math.floor(rest / 3600);
  rest -= hours * 3600;
  const minutes = Math.floor(rest / 60);
  const secs = rest - minutes * 60;
  const two = (n: number) => String(n).padStart(2, '0');
  if (days) {
    return hours ? `${days}d ${hours}h` : `${days}d`;
  }
  if (hours) {
    return minutes ? `${hours}h ${two(minutes)}m` : `${hours}h`;
  }
  if (minutes >= 10) {
    return `${minutes}m`;
  }
  if (minutes) {
    return secs ? `${minutes}m ${two(secs)}s` : `${minutes}m`;
  }
  return `${secs}s`;
}

/** `8589934592` -> `8 GiB`, `536870912` -> `512 MiB`. */
export function formatBytes(nbytes: number): string {
  if (nbytes >= GIB || nbytes === 0) {
    return `${trim(nbytes / GIB)} GiB`;
  }
  return `${trim(nbytes / MIB)} MiB`;
}

function trim(value: number): string {
  return String(Number(value.toPrecision(3)));
}

/** Memory in use against the cap, in the cap's unit: `3.1 / 8 GiB`, `200 / 512 MiB`. */
export function usedOfCap(used: number | null, cap: number): string {
  const unit = cap >= GIB ? GIB : MIB;
  const name = cap >= GIB ? 'GiB' : 'MiB';
  const capText = trim(cap / unit);
  if (used === null) {
    return `? / ${capText} ${name}`;
  }
  const usedValue = used / unit;
  const usedText = usedValue >= 10 ? String(Math.round(usedValue)) : String(Number(usedValue.toFixed(1)));
  return `${usedText} / ${capText} ${name}`;
}

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

/** A wall-clock time in the browser's zone as the CLI writes one (chronos.units.format_clock):
 * `14:05` today, `Dec 02 00:04` another day. */
export function formatClock(epochMs: number): string {
  const date = new Date(epochMs);
  const two = (n: number) => String(n).padStart(2, '0');
  const clock = `${two(date.getHours())}:${two(date.getMinutes())}`;
  if (date.toDateString() === new Date().toDateString()) {
    return clock;
  }
  return `${MONTHS[date.getMonth()]} ${two(date.getDate())} ${clock}`;
}

/** `GPU 0` or `GPUs 0,1`. */
export function devicesText(devices: number[]): string {
  return devices.length > 1 ? `GPUs ${devices.join(',')}` : `GPU ${devices.join(',')}`;
}

/** The clock skew between this browser and the server: server time = Date.now() / 1000 + offset. */
export class ServerClock {
  private _offset = 0;

  update(status: IStatus): void {
    this._offset = status.now - Date.now() / 1000;
  }

  /** Seconds since the epoch, on the server's clock. */
  now(): number {
    return Date.now() / 1000 + this._offset;
  }

  /** A server epoch (seconds) as a time in this browser (milliseconds), for display. */
  toLocalMs(epoch: number): number {
    return (epoch - this._offset) * 1000;
  }
}

/** How a lease looks now: its level decides the colour. */
export type Level = 'ok' | 'warning' | 'critical' | 'queued' | 'ended' | 'none';

export function levelOf(lease: ILease | null, remaining: number): Level {
  if (!lease) {
    return 'none';
  }
  if (lease.state === 'queued') {
    return 'queued';
  }
  if (lease.state !== 'active' || remaining <= 0) {
    return 'ended';
  }
  return remaining < CRITICAL_S ? 'critical' : remaining < WARNING_S ? 'warning' : 'ok';
}

export function remainingOf(lease: ILease, clock: ServerClock): number {
  if (lease.state !== 'active' || lease.expires_at === null) {
    return lease.state === 'queued' ? lease.duration_s : 0;
  }
  return Math.max(0, lease.expires_at - clock.now());
}

/** The status item's text for one lease: `GPU 0 · 3.1 / 8 GiB · 1h 12m left`, `queued #2 · starts ≈14:05`. */
export function leaseLine(lease: ILease | null, clock: ServerClock): string {
  if (!lease) {
    return 'no GPU lease';
  }
  if (lease.state === 'queued') {
    const place = lease.position ? `queued #${lease.position}` : 'queued';
    return lease.estimated_start !== null
      ? `${place} · starts ≈${formatClock(clock.toLocalMs(lease.estimated_start))}`
      : place;
  }
  const remaining = remainingOf(lease, clock);
  const time = remaining > 0 ? `${formatDuration(remaining)} left` : 'ended';
  return `${devicesText(lease.devices)} · ${usedOfCap(lease.used_bytes, lease.cap_bytes)} · ${time}`;
}

/** The kernel of this notebook (by kernel id, or while it starts by the notebook's path). */
export function kernelOf(status: IStatus | null, kernelId: string | null, path: string | null): IKernel | null {
  if (!status) {
    return null;
  }
  if (kernelId) {
    const running = status.kernels.find(k => k.kernel_id === kernelId && !k.starting);
    if (running) {
      return running;
    }
  }
  if (path) {
    return status.kernels.find(k => k.starting && k.path === path) ?? null;
  }
  return null;
}

/** The live lease a kernel holds (its own first), or null. */
export function leaseOfKernel(status: IStatus | null, kernel: IKernel | null): ILease | null {
  if (!status || !kernel) {
    return null;
  }
  for (const id of kernel.lease_ids) {
    const lease = status.leases.find(l => l.id === id);
    if (lease) {
      return lease;
    }
  }
  return null;
}

/** What a lease is called in messages: `lease 7 (training)`. */
export function leaseName(lease: ILease): string {
  const label = lease.label && !lease.label.startsWith('jupyter ') ? lease.label : '';
  if (!label) {
    return `lease ${lease.id}`;
  }
  return `lease ${lease.id} (${label.length > 24 ? `${label.slice(0, 23)}…` : label})`;
}
