/**
 * The Chronos side panel: every GPU (reserved, used and free memory), your leases with Extend and
 * Release, the queue, and the Chronos kernels with whether each fits now.
 */
import { Widget } from '@lumino/widgets';
import { IGpu, IKernel, IKernelspec, ILease, IStatus } from './api';
import { h, fill } from './dom';
import {
  devicesText,
  formatBytes,
  formatClock,
  formatDuration,
  leaseLine,
  levelOf,
  remainingOf,
  ServerClock
} from './format';
import { StatusModel } from './model';

export interface IPanelActions {
  extend(lease: ILease): void;
  release(lease: ILease, kernel: IKernel | null): void;
  extendLabel(): string;
}

export class ChronosPanel extends Widget {
  private readonly _header = h('div', { class: 'jp-ChronosPanel-header' });
  private readonly _gpus = h('div', { class: 'jp-ChronosPanel-gpus' });
  private readonly _leases = h('div', { class: 'jp-ChronosPanel-leases' });
  private readonly _queue = h('div', { class: 'jp-ChronosPanel-queue' });
  private readonly _kernels = h('div', { class: 'jp-ChronosPanel-kernelspecs' });
  private _drawn: string | null = null;

  constructor(
    private readonly _model: StatusModel,
    private readonly _actions: IPanelActions
  ) {
    super();
    this.id = 'chronos-panel';
    this.addClass('jp-ChronosPanel');
    this.title.caption = 'Chronos GPU leases';
    this.node.append(
      h('h2', { class: 'jp-ChronosPanel-title' }, 'Chronos GPU leases'),
      this._header,
      h('h3', {}, 'GPUs'),
      this._gpus,
      h('h3', {}, 'Your leases'),
      this._leases,
      h('h3', {}, 'Queue'),
      this._queue,
      h('h3', {}, 'GPU kernels'),
      this._kernels
    );
    this._model.changed.connect(this._redraw, this);
    this._model.ticked.connect(this._countdown, this);
    this._redraw();
  }

  private _redraw(): void {
    if (!this.isVisible && this._drawn !== null) {
      return;
    }
    const status = this._model.status;
    const error = this._model.error;
    // Redraw only what changed: a button replaced under the pointer would lose its click.
    const key = JSON.stringify([status ? { ...status, now: 0 } : null, error?.message ?? null]);
    if (key === this._drawn) {
      return;
    }
    this._drawn = key;
    fill(
      this._header,
      status ? `${status.user} · Chronos ${status.version}` : 'No status from the server yet.',
      error ? h('div', { class: 'jp-ChronosPanel-error' }, error.message) : null
    );
    if (!status) {
      fill(this._gpus);
      fill(this._leases);
      fill(this._queue);
      fill(this._kernels);
      return;
    }
    fill(this._gpus, ...status.gpus.map(gpu => gpuRow(gpu)));
    const kernels = status.kernels;
    fill(
      this._leases,
      ...(status.leases.length
        ? status.leases.map(lease => this._leaseRow(lease, kernels))
        : [h('p', { class: 'jp-ChronosPanel-empty' }, 'You hold no lease.')])
    );
    fill(this._queue, queueTable(status, this._model.clock));
    fill(
      this._kernels,
      ...(status.kernelspecs.length
        ? status.kernelspecs.map(spec => kernelspecRow(spec, this._model.clock))
        : [h('p', { class: 'jp-ChronosPanel-empty' }, 'No Chronos kernelspecs are installed.')])
    );
  }

  protected onAfterShow(): void {
    this._drawn = null;
    this._redraw();
  }

  private _countdown(): void {
    if (!this.isVisible) {
      return;
    }
    const clock = this._model.clock;
    for (const row of Array.from(this._leases.querySelectorAll<HTMLElement>('.jp-ChronosLease'))) {
      const lease = this._model.status?.leases.find(l => l.id === row.dataset.leaseId);
      const line = row.querySelector('.jp-ChronosLease-line');
      if (lease && line) {
        line.textContent = leaseLine(lease, clock);
        setLevel(row, levelOf(lease, remainingOf(lease, clock)));
      }
    }
  }

  private _leaseRow(lease: ILease, kernels: IKernel[]): HTMLElement {
    const clock = this._model.clock;
    const kernel = kernels.find(k => k.lease_ids.includes(lease.id)) ?? null;
    const where = kernel
      ? `kernel ${kernel.kernel_name}${kernel.path ? ` · ${kernel.path}` : ''}${kernel.starting ? ' (starting)' : ''}`
      : lease.label
        ? lease.label
        : 'not held by a kernel of this server';
    const extend = h('button', { class: 'jp-Button jp-mod-styled jp-mod-accept jp-ChronosLease-extend', type: 'button' },
      this._actions.extendLabel());
    extend.addEventListener('click', () => this._actions.extend(lease));
    const release = h('button', { class: 'jp-Button jp-mod-styled jp-mod-warn jp-ChronosLease-release', type: 'button' },
      lease.state === 'queued' ? 'Withdraw' : 'Release');
    release.addEventListener('click', () => this._actions.release(lease, kernel));
    const ends =
      lease.state === 'active' && lease.expires_at !== null
        ? `ends ${formatClock(clock.toLocalMs(lease.expires_at))}`
        : `for ${formatDuration(lease.duration_s)}`;
    const row = h(
      'div',
      { class: 'jp-ChronosLease', 'data-lease-id': lease.id },
      h('div', { class: 'jp-ChronosLease-title' }, `Lease ${lease.id}`, h('span', { class: 'jp-ChronosLease-ends' }, ends)),
      h('div', { class: 'jp-ChronosLease-line' }, leaseLine(lease, clock)),
      h('div', { class: 'jp-ChronosLease-where' }, where),
      h('div', { class: 'jp-ChronosLease-buttons' }, lease.state === 'active' ? extend : null, release)
    );
    setLevel(row, levelOf(lease, remainingOf(lease, clock)));
    return row;
  }
}

function setLevel(node: HTMLElement, level: string): void {
  for (const name of ['ok', 'warning', 'critical', 'queued', 'ended', 'none']) {
    node.classList.toggle(`jp-mod-${name}`, name === level);
  }
}

function percent(part: number, whole: number): string {
  return `${whole > 0 ? Math.max(0, Math.min(100, (100 * part) / whole)) : 0}%`;
}

function gpuRow(gpu: IGpu): HTMLElement {
  const total = gpu.total_bytes;
  const reserved = h('div', { class: 'jp-ChronosBar-reserved', style: `width: ${percent(gpu.reserved_bytes, total)}` });
  const unmanaged = h('div', { class: 'jp-ChronosBar-unmanaged', style: `width: ${percent(gpu.unmanaged_bytes, total)}` });
  const used = h('div', { class: 'jp-ChronosBar-used', style: `width: ${percent(gpu.used_bytes, total)}` });
  const words = [
    `${formatBytes(gpu.reserved_bytes)} reserved`,
    `${formatBytes(gpu.used_bytes)} used`,
    gpu.unmanaged_bytes ? `${formatBytes(gpu.unmanaged_bytes)} outside leases` : '',
    `${formatBytes(gpu.free_bytes)} free`
  ].filter(Boolean);
  return h(
    'div',
    { class: 'jp-ChronosGpu', 'data-gpu': String(gpu.index) },
    h('div', { class: 'jp-ChronosGpu-name' }, `${devicesText([gpu.index])} · ${formatBytes(total)}`,
      h('span', { class: 'jp-ChronosGpu-model' }, gpu.name)),
    h('div', { class: 'jp-ChronosBar', title: 'reserved by leases, used outside leases, free' }, reserved, unmanaged),
    h('div', { class: 'jp-ChronosBar jp-ChronosBar-thin', title: 'memory in use' }, used),
    h('div', { class: 'jp-ChronosGpu-figures' }, words.join(' · '))
  );
}

function queueTable(status: IStatus, clock: ServerClock): HTMLElement {
  if (!status.queue.length) {
    return h('p', { class: 'jp-ChronosPanel-empty' }, 'Nobody is waiting.');
  }
  const head = h('tr', {}, ...['#', 'who', 'memory', 'where', 'starts'].map(t => h('th', {}, t)));
  const rows = status.queue.map(entry =>
    h(
      'tr',
      { 'data-lease-id': entry.lease_id, class: entry.owner === status.user ? 'jp-mod-mine' : undefined },
      h('td', {}, String(entry.position)),
      h('td', {}, entry.owner),
      h('td', {}, `${entry.memory} · ${formatDuration(entry.duration_s)}`),
      h('td', {}, entry.wanted),
      h('td', {}, entry.estimated_start !== null ? `≈${formatClock(clock.toLocalMs(entry.estimated_start))}` : 'unknown')
    )
  );
  return h('table', { class: 'jp-ChronosQueue' }, h('thead', {}, head), h('tbody', {}, ...rows));
}

/** `fits now`, `starts ≈14:05`, or why it cannot start: the launcher card's badge says the same. */
export function forecastText(spec: IKernelspec, clock: ServerClock): { text: string; level: string } {
  const forecast = spec.forecast;
  if (spec.problem && !forecast) {
    return { text: spec.problem, level: 'critical' };
  }
  if (!forecast) {
    return { text: '', level: 'none' };
  }
  if (forecast.error) {
    return { text: forecast.error, level: 'critical' };
  }
  if (forecast.fits_now) {
    return { text: 'fits now', level: 'ok' };
  }
  if (forecast.estimated_start !== null) {
    return { text: `starts ≈${formatClock(clock.toLocalMs(forecast.estimated_start))}`, level: 'warning' };
  }
  return { text: 'no GPU free in view', level: 'critical' };
}

function kernelspecRow(spec: IKernelspec, clock: ServerClock): HTMLElement {
  const { text, level } = forecastText(spec, clock);
  const row = h(
    'div',
    { class: 'jp-ChronosKernelspec', 'data-kernelspec': spec.name, title: spec.forecast?.reason ?? spec.problem ?? '' },
    h('div', { class: 'jp-ChronosKernelspec-name' }, spec.display_name),
    h('div', { class: 'jp-ChronosKernelspec-summary' }, spec.summary),
    h('div', { class: 'jp-ChronosKernelspec-forecast' }, text)
  );
  setLevel(row, level);
  return row;
}
