/**
 * The status item for the current notebook's kernel: `GPU 0 · 3.1 / 8 GiB · 1h 12m left` (amber
 * under ten minutes, red under one), `queued #2 · starts ≈14:05` while the kernel waits for its
 * lease, `no GPU lease` otherwise. Clicking it opens the Chronos panel.
 */
import { Widget } from '@lumino/widgets';
import { ILease, IKernel } from './api';
import { kernelOf, leaseLine, leaseOfKernel, levelOf, remainingOf } from './format';
import { StatusModel } from './model';

/** Where the current notebook's kernel is: its id once running, its path while it starts. */
export interface ICurrentKernel {
  kernelId(): string | null;
  path(): string | null;
}

export class ChronosStatus extends Widget {
  constructor(
    private readonly _model: StatusModel,
    private readonly _current: ICurrentKernel,
    private readonly _open: () => void
  ) {
    super({ node: document.createElement('div') });
    this.addClass('jp-ChronosStatus');
    this.addClass('jp-StatusBar-TextItem');
    this.node.setAttribute('role', 'button');
    this.node.setAttribute('tabindex', '0');
    this.node.addEventListener('click', () => this._open());
    this.node.addEventListener('keydown', event => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        this._open();
      }
    });
    this._model.changed.connect(this.update, this);
    this._model.ticked.connect(this.update, this);
    this.update();
  }

  /** The kernel and lease shown now (for the panel and the tests alike). */
  current(): { kernel: IKernel | null; lease: ILease | null } {
    const status = this._model.status;
    const kernel = kernelOf(status, this._current.kernelId(), this._current.path());
    return { kernel, lease: leaseOfKernel(status, kernel) };
  }

  update(): void {
    const { lease } = this.current();
    const clock = this._model.clock;
    const unavailable = this._model.status === null;
    const text = !unavailable ? leaseLine(lease, clock) : this._model.error ? 'Chronos: no status' : 'Chronos …';
    const level = unavailable ? 'none' : levelOf(lease, lease ? remainingOf(lease, clock) : 0);
    if (this.node.textContent !== text) {
      this.node.textContent = text;
    }
    for (const name of ['ok', 'warning', 'critical', 'queued', 'ended', 'none']) {
      this.node.classList.toggle(`jp-mod-${name}`, name === level);
    }
    const error = this._model.error;
    this.node.title = error
      ? `Chronos: ${error.message}`
      : lease
        ? `Chronos lease ${lease.id}: click for your leases, the GPUs and the queue`
        : 'Chronos: click for your leases, the GPUs and the queue';
    this.node.dataset.leaseId = lease ? lease.id : '';
  }
}
