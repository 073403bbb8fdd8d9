/**
 * The Chronos REST API of the Jupyter Server extension (chronos_jupyter.server), typed.
 *
 * Every figure is computed by the server; this side only shows it, so the numbers here are the
 * numbers `chronos stats`, `chronos list` and `chronos queue` show.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface IGpu {
  index: number;
  uuid: string;
  name: string;
  total_bytes: number;
  reserved_bytes: number;
  used_bytes: number;
  unmanaged_bytes: number;
  free_bytes: number;
  active_leases: number;
  utilization_percent: number | null;
}

export interface ILease {
  id: string;
  owner: string;
  devices: number[];
  memory_bytes: number;
  cap_bytes: number;
  used_bytes: number | null;
  created_at: number;
  started_at: number | null;
  expires_at: number | null;
  ended_at: number | null;
  end_reason: string | null;
  duration_s: number;
  state: 'queued' | 'active' | 'released' | 'expired' | 'revoked' | 'withdrawn';
  label: string | null;
  pid: number | null;
  priority: string;
  warn_at: number[];
  position: number | null;
  estimated_start: number | null;
}

export interface IQueueEntry {
  lease_id: string;
  position: number;
  owner: string;
  priority: string;
  memory: string;
  wanted: string;
  duration_s: number;
  estimated_start: number | null;
  label: string | null;
}

export interface IKernel {
  kernel_id: string;
  kernel_name: string;
  path: string | null;
  lease_ids: string[];
  starting: boolean;
  own_lease_id: string | null;
  on_expiry: string | null;
}

export interface IForecast {
  fits_now: boolean;
  devices: number[];
  position: number | null;
  estimated_start: number | null;
  reason: string;
  error: string | null;
  exit_code: number;
}

export interface IKernelspec {
  name: string;
  display_name: string;
  summary: string;
  problem: string | null;
  forecast: IForecast | null;
}

export interface IStatus {
  now: number;
  user: string;
  version: string;
  gpus: IGpu[];
  leases: ILease[];
  ended: ILease[];
  queue: IQueueEntry[];
  kernels: IKernel[];
  kernelspecs: IKernelspec[];
  /** What the machine does to a lease's processes at its end: warn, interrupt, terminate or kill. */
  on_expiry: string;
}

/** A refusal from the server, with the one-line message the CLI would print. */
export class ChronosError extends Error {
  constructor(
    message: string,
    readonly status: number
  ) {
    super(message);
  }
}

async function call<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'chronos/api', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ChronosError(`the Jupyter server cannot be reached: ${error}`, 0);
  }
  const text = await response.text();
  let data: any = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message =
      data && typeof data.message === 'string'
        ? data.message
        : `the server answered ${response.status} ${response.statusText}`;
    throw new ChronosError(message, response.status);
  }
  return data as T;
}

export function fetchStatus(): Promise<IStatus> {
  return call<IStatus>('status');
}

export function extendLease(id: string, duration: string): Promise<ILease> {
  return call<ILease>(`leases/${encodeURIComponent(id)}/extend`, {
    method: 'POST',
    body: JSON.stringify({ duration })
  });
}

export function releaseLease(id: string): Promise<ILease> {
  return call<ILease>(`leases/${encodeURIComponent(id)}`, { method: 'DELETE' });
}
