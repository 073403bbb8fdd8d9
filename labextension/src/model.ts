/**
 * The status as last read from the server, refreshed while the page is visible.
 *
 * At most one request a second (the `refreshSeconds` setting, 1 at least), none while the tab is
 * hidden (the Page Visibility API): when it is shown again the status is read at once. A failed
 * read backs off up to 30 seconds. `ticked` fires every second while visible, so countdowns move
 * between reads.
 */
import { ISignal, Signal } from '@lumino/signaling';
import { ChronosError, IStatus, fetchStatus } from './api';
import { ServerClock } from './format';

const MAX_BACKOFF_MS = 30_000;

export class StatusModel {
  readonly clock = new ServerClock();
  private _status: IStatus | null = null;
  private _error: ChronosError | null = null;
  private _intervalMs = 1000;
  private _failures = 0;
  private _poll: number | null = null;
  private _tick: number | null = null;
  private _inFlight: Promise<void> | null = null;
  private _disposed = false;
  private _changed = new Signal<this, IStatus | null>(this);
  private _ticked = new Signal<this, void>(this);
  private _onVisibility = () => this._visibilityChanged();

  constructor() {
    document.addEventListener('visibilitychange', this._onVisibility);
    this._visibilityChanged();
  }

  /** The last status read, or null before the first (or when the server has no Chronos API). */
  get status(): IStatus | null {
    return this._status;
  }

  /** Why the last read failed, or null. */
  get error(): ChronosError | null {
    return this._error;
  }

  /** Fired after every read (a new status, or a failure). */
  get changed(): ISignal<this, IStatus | null> {
    return this._changed;
  }

  /** Fired every second while the page is visible. */
  get ticked(): ISignal<this, void> {
    return this._ticked;
  }

  set refreshSeconds(seconds: number) {
    this._intervalMs = Math.max(1000, Math.round((Number(seconds) || 1) * 1000));
    if (this._poll !== null) {
      this._schedule();
    }
  }

  /** Read the status now (after an action, or when the current notebook changes). */
  refresh(): Promise<void> {
    if (this._inFlight) {
      return this._inFlight;
    }
    this._inFlight = this._read().finally(() => {
      this._inFlight = null;
    });
    return this._inFlight;
  }

  dispose(): void {
    this._disposed = true;
    document.removeEventListener('visibilitychange', this._onVisibility);
    this._stop();
  }

  private async _read(): Promise<void> {
    try {
      const status = await fetchStatus();
      this.clock.update(status);
      this._status = status;
      this._error = null;
      this._failures = 0;
    } catch (error) {
      this._error = error instanceof ChronosError ? error : new ChronosError(String(error), 0);
      this._failures += 1;
      if (this._error.status === 404) {
        this._status = null;
      }
    }
    this._changed.emit(this._status);
  }

  private _visibilityChanged(): void {
    if (document.visibilityState === 'hidden') {
      this._stop();
      return;
    }
    if (this._disposed) {
      return;
    }
    void this.refresh().then(() => this._schedule());
    if (this._tick === null) {
      this._tick = window.setInterval(() => this._ticked.emit(), 1000);
    }
  }

  private _schedule(): void {
    if (this._poll !== null) {
      window.clearTimeout(this._poll);
    }
    if (this._disposed || document.visibilityState === 'hidden') {
      this._poll = null;
      return;
    }
    const backoff = Math.min(MAX_BACKOFF_MS, this._intervalMs * 2 ** Math.min(this._failures, 5));
    this._poll = window.setTimeout(() => {
      void this.refresh().then(() => this._schedule());
    }, this._failures ? backoff : this._intervalMs);
  }

  private _stop(): void {
    if (this._poll !== null) {
      window.clearTimeout(this._poll);
      this._poll = null;
    }
    if (this._tick !== null) {
      window.clearInterval(this._tick);
      this._tick = null;
    }
  }
}
