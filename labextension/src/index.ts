/**
 * Chronos in JupyterLab 4 and Notebook 7: a status item for the current notebook's kernel, a side
 * panel with the GPUs, your leases and the queue, badges on the launcher's GPU kernels, and
 * notifications before a kernel's lease ends. Everything is read from the server extension's REST
 * API (chronos_jupyter.server); nothing here computes a figure of its own.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Dialog, Notification, showDialog } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Signal } from '@lumino/signaling';
import { IKernel, ILease, extendLease, releaseLease } from './api';
import { formatClock, leaseName } from './format';
import { LauncherBadges } from './launcher';
import { StatusModel } from './model';
import { LeaseNotifier } from './notify';
import { ChronosPanel } from './panel';
import { ChronosStatus, ICurrentKernel } from './statusitem';

const PLUGIN_ID = '@chronos-gpu/jupyterlab:plugin';

const chronosIcon = new LabIcon({
  name: 'chronos:gpu',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
    '<g class="jp-icon3" fill="#616161"><path d="M12 2a10 10 0 1 0 0 20 10 10 0 0 0 0-20zm0 2a8 8 0 1 1 0 16 8 8 0 0 1 0-16z"/>' +
    '<path d="M11 6h2v6.4l4 2.3-1 1.7-5-2.9z"/></g></svg>'
});

export const CommandIDs = {
  open: 'chronos:open-panel',
  refresh: 'chronos:refresh'
};

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Chronos GPU leases where you work: status item, panel, launcher badges, notifications.',
  autoStart: true,
  optional: [IStatusBar, INotebookTracker, ISettingRegistry],
  activate: (
    app: JupyterFrontEnd,
    statusBar: IStatusBar | null,
    tracker: INotebookTracker | null,
    settingRegistry: ISettingRegistry | null
  ) => {
    const model = new StatusModel();
    let extendBy = '30m';
    let notifications = true;
    const extendLabel = () => `Extend ${extendBy}`;

    const extend = async (lease: ILease): Promise<void> => {
      try {
        const extended = await extendLease(lease.id, extendBy);
        const ends = extended.expires_at !== null ? formatClock(model.clock.toLocalMs(extended.expires_at)) : '?';
        Notification.success(`Chronos ${leaseName(extended)} extended by ${extendBy}: it now ends at ${ends}.`, {
          autoClose: 5000
        });
      } catch (error) {
        Notification.error(`Chronos: cannot extend lease ${lease.id}: ${(error as Error).message}`, { autoClose: false });
      }
      await model.refresh();
    };

    const notifier = new LeaseNotifier(model, { extend, extendLabel, enabled: () => notifications });

    const release = async (lease: ILease, kernel: IKernel | null): Promise<void> => {
      const own = kernel !== null && kernel.own_lease_id === lease.id;
      const where = kernel?.path ? ` (${kernel.path})` : '';
      let body: string;
      let label: string;
      if (own && kernel?.starting) {
        body = `The kernel${where} is waiting for this lease: withdrawing it cancels the kernel's start.`;
        label = 'Withdraw and cancel the start';
      } else if (own && ['terminate', 'kill'].includes(kernel?.on_expiry ?? 'terminate')) {
        body =
          `This is the lease of the kernel${where}. The kernel will be stopped when it is released ` +
          '(its variables are lost), and its GPU memory goes back to others at once.';
        label = 'Release and stop the kernel';
      } else if (own) {
        body =
          `This is the lease of the kernel${where}. Its kernelspec keeps the kernel running without it ` +
          `(on_expiry ${kernel?.on_expiry}); its GPU memory goes back to others at once.`;
        label = 'Release';
      } else if (lease.state === 'queued') {
        body = 'The request leaves the queue.';
        label = 'Withdraw';
      } else {
        body = kernel
          ? `The kernel${where} keeps running, without a GPU lease; its GPU memory goes back to others at once.`
          : 'Its GPU memory goes back to others at once.';
        label = 'Release';
      }
      const answer = await showDialog({
        title: `Release Chronos ${leaseName(lease)}?`,
        body,
        buttons: [Dialog.cancelButton(), Dialog.warnButton({ label })]
      });
      if (!answer.button.accept) {
        return;
      }
      notifier.quiet(lease.id);
      try {
        await releaseLease(lease.id);
        Notification.info(`Chronos ${leaseName(lease)} released.`, { autoClose: 5000 });
      } catch (error) {
        Notification.error(`Chronos: cannot release lease ${lease.id}: ${(error as Error).message}`, {
          autoClose: false
        });
      }
      await model.refresh();
    };

    const panel = new ChronosPanel(model, {
      extend: lease => void extend(lease),
      release: (lease, kernel) => void release(lease, kernel),
      extendLabel
    });
    panel.title.icon = chronosIcon;
    app.shell.add(panel, 'right', { rank: 950 });

    app.commands.addCommand(CommandIDs.open, {
      label: 'Show Chronos GPU leases',
      caption: 'Your GPU leases, the GPUs and the queue',
      icon: chronosIcon,
      execute: () => {
        app.shell.activateById(panel.id);
        void model.refresh();
      }
    });
    app.commands.addCommand(CommandIDs.refresh, {
      label: 'Refresh Chronos GPU leases',
      execute: () => model.refresh()
    });

    const current: ICurrentKernel = {
      kernelId: () => tracker?.currentWidget?.sessionContext.session?.kernel?.id ?? null,
      path: () => tracker?.currentWidget?.sessionContext.path ?? null
    };
    const open = () => void app.commands.execute(CommandIDs.open);

    if (statusBar) {
      const item = new ChronosStatus(model, current, open);
      const activeChanged = new Signal<ChronosStatus, void>(item);
      statusBar.registerStatusItem(PLUGIN_ID, {
        item,
        align: 'left',
        rank: 4,
        isActive: () => !!tracker?.currentWidget,
        activeStateChanged: activeChanged
      });
      tracker?.currentChanged.connect(() => {
        activeChanged.emit();
        item.update();
      });
    } else if (tracker) {
      // Notebook 7 has no status bar: the item goes in each notebook's toolbar, by the kernel's name.
      tracker.widgetAdded.connect((_, notebook: NotebookPanel) => {
        const item = new ChronosStatus(model, {
          kernelId: () => notebook.sessionContext.session?.kernel?.id ?? null,
          path: () => notebook.sessionContext.path
        }, open);
        notebook.toolbar.insertBefore('kernelName', 'chronosStatus', item) ||
          notebook.toolbar.addItem('chronosStatus', item);
      });
    }

    const follow = (notebook: NotebookPanel | null) => {
      notebook?.sessionContext.statusChanged.connect(() => void model.refresh());
      notebook?.sessionContext.kernelChanged.connect(() => void model.refresh());
    };
    tracker?.widgetAdded.connect((_, notebook) => follow(notebook));
    tracker?.currentChanged.connect(() => void model.refresh());

    new LauncherBadges(model);

    if (settingRegistry) {
      void settingRegistry.load(PLUGIN_ID).then(settings => {
        const apply = () => {
          model.refreshSeconds = Number(settings.get('refreshSeconds').composite) || 1;
          notifications = settings.get('notifications').composite !== false;
          extendBy = String(settings.get('extendBy').composite || '30m');
        };
        apply();
        settings.changed.connect(apply);
      }, () => undefined);
    }
  }
};

export default plugin;
