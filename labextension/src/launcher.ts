/**
 * A badge on each launcher card of a Chronos kernelspec: `fits now`, or `starts ≈14:05` when it
 * would wait in the queue, or why it cannot start here. Cards are matched by the kernelspec's
 * display name (the launcher's card title); the launcher redraws its cards at will, so badges are
 * put back after every status read.
 */
import { IKernelspec } from './api';
import { h } from './dom';
import { StatusModel } from './model';
import { forecastText } from './panel';

const BADGE = 'jp-ChronosLauncherBadge';
const KERNEL_CATEGORIES = ['Notebook', 'Console'];

export class LauncherBadges {
  private _observer: MutationObserver;
  private _scheduled = false;

  constructor(private readonly _model: StatusModel) {
    this._model.changed.connect(() => this.decorate());
    // A launcher opened (or redrawn) between two reads gets its badges at once.
    this._observer = new MutationObserver(mutations => {
      if (mutations.some(m => Array.from(m.addedNodes).some(n => n instanceof HTMLElement && isLauncherNode(n)))) {
        this._soon();
      }
    });
    this._observer.observe(document.body, { childList: true, subtree: true });
  }

  private _soon(): void {
    if (this._scheduled) {
      return;
    }
    this._scheduled = true;
    requestAnimationFrame(() => {
      this._scheduled = false;
      this.decorate();
    });
  }

  decorate(): void {
    const status = this._model.status;
    const byName = new Map<string, IKernelspec>();
    for (const spec of status?.kernelspecs ?? []) {
      byName.set(spec.display_name, spec);
    }
    const cards = document.querySelectorAll<HTMLElement>('.jp-LauncherCard');
    for (const card of Array.from(cards)) {
      if (!KERNEL_CATEGORIES.includes(card.dataset.category ?? '')) {
        continue;
      }
      const spec = byName.get(card.title);
      let badge = card.querySelector<HTMLElement>(`.${BADGE}`);
      if (!spec) {
        badge?.remove();
        continue;
      }
      const { text, level } = forecastText(spec, this._model.clock);
      if (!badge) {
        badge = h('div', { class: BADGE });
        card.classList.add('jp-ChronosLauncherCard');
        card.appendChild(badge);
      }
      if (badge.textContent !== text) {
        badge.textContent = text;
      }
      badge.title = spec.forecast?.reason || spec.problem || text;
      badge.dataset.level = level;
      badge.dataset.kernelspec = spec.name;
    }
  }

  dispose(): void {
    this._observer.disconnect();
  }
}

const LAUNCHER_CLASSES = ['jp-Launcher', 'jp-Launcher-body', 'jp-Launcher-section', 'jp-LauncherCard'];

/** Cheap on purpose: the body sees every added node of the page (an editor adds many). */
function isLauncherNode(node: HTMLElement): boolean {
  return LAUNCHER_CLASSES.some(name => node.classList.contains(name));
}
