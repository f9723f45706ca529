// The one way the UI talks to ferrod: its public REST API (crates/manager/openapi.json) on the
// same origin, signed in by the session cookie. Changes carry X-Ferro-CSRF (docs/remote.md).

export type Role = "admin" | "readonly";
export type DomainState = "shutoff" | "running" | "paused" | "crashed";

export interface Session {
  role: Role;
  via: "unix" | "token" | "session" | "open";
  expires_ms: number | null;
}

export interface DiskConfig {
  path?: string;
  pool?: string;
  volume?: string;
  format: string;
  readonly: boolean;
}

export interface DomainConfig {
  name: string;
  memory: string;
  vcpus: number;
  boot: { from?: string; kernel?: string; initrd?: string; cmdline?: string; guest?: string };
  disk?: DiskConfig[];
  nic?: { tap?: string; network?: string; bridge?: string; mac?: string }[];
}

export interface Domain {
  name: string;
  uuid: string;
  state: DomainState;
  autostart: boolean;
  vcpus: number | null;
  memory_bytes: number | null;
  pid: number | null;
  started_ms: number | null;
  crash: { reason: string } | null;
  error: string | null;
  config: DomainConfig | null;
}

export interface DomainStats {
  name: string;
  state: DomainState;
  memory_bytes: number;
  vcpus: number;
  cpu_time_ns: number;
  rss_bytes: number;
  disks: { id: string; read_bytes: number; write_bytes: number; read_ops: number; write_ops: number }[];
  nics: { id: string; mac: string; rx_bytes: number; tx_bytes: number }[];
}

export interface Host {
  version: string;
  hostname: string;
  cpus: number;
  load: [number, number, number];
  memory_total_bytes: number;
  memory_available_bytes: number;
  domains: { total: number; running: number; paused: number; shutoff: number; crashed: number };
}

export interface Pool {
  name: string;
  type: string;
  target: string;
  active: boolean;
  autostart: boolean;
  capacity: number | null;
  available: number | null;
  volumes: number | null;
}

export interface Volume {
  name: string;
  pool: string;
  path: string;
  format: string;
  capacity: number;
  allocation: number;
  backing: string | null;
}

export interface Job {
  id: number;
  kind: string;
  source: string;
  target: string;
  state: "running" | "completed" | "failed" | "cancelled";
  done_bytes?: number;
  total_bytes?: number;
  done_steps?: number;
  total_steps?: number;
  started_ms: number;
  finished_ms: number | null;
  error: string | null;
}

export interface Snapshot {
  domain: string;
  name: string;
  parent: string | null;
  children: string[];
  state: "running" | "paused" | "shutoff";
  created: string;
  created_ms: number;
  current: boolean;
  description: string | null;
  pause_us: number | null;
  memory_bytes: number | null;
  disks: string[];
}

export interface FerroEvent {
  seq: number;
  time_ms: number;
  object: string;
  name: string;
  kind: string;
  detail: string;
}

export class ApiError extends Error {
  constructor(
    public status: number,
    public code: string,
    message: string,
  ) {
    super(message);
  }
}

let signedOut: () => void = () => {};

/** What to do when ferrod says the session is gone (401): show the sign-in form. */
export function onSignedOut(handler: () => void): void {
  signedOut = handler;
}

const isRead = (method: string) => method === "GET" || method === "HEAD";

export async function request(method: string, path: string, body?: unknown, contentType?: string): Promise<Response> {
  const headers: Record<string, string> = {};
  if (!isRead(method)) headers["X-Ferro-CSRF"] = "1";
  let payload: BodyInit | undefined;
  if (typeof body === "string") {
    payload = body;
    headers["Content-Type"] = contentType ?? "text/plain";
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  if (!response.ok) throw await errorOf(response, method, path);
  return response;
}

async function errorOf(response: Response, method: string, path: string): Promise<ApiError> {
  let code = "http";
  let message = `${method} ${path}: HTTP ${response.status}`;
  try {
    const body = await response.json();
    code = body.code ?? code;
    message = body.message ?? message;
  } catch {
    // not JSON: keep the generic message
  }
  if (response.status === 401 && path !== "/v1/session") signedOut();
  return new ApiError(response.status, code, message);
}

export async function get<T>(path: string): Promise<T> {
  return (await request("GET", path)).json();
}

export async function send<T>(method: string, path: string, body?: unknown, contentType?: string): Promise<T | null> {
  const response = await request(method, path, body, contentType);
  return response.status === 204 ? null : response.json();
}

/** GET /v1/session: who is signed in, or null when the sign-in form is needed. */
export async function whoAmI(): Promise<Session | null> {
  const response = await fetch("/v1/session", { credentials: "same-origin" });
  if (response.status === 401) return null;
  if (!response.ok) throw await errorOf(response, "GET", "/v1/session");
  return response.json();
}

export async function signIn(token: string): Promise<Session> {
  return (await send<Session>("POST", "/v1/session", { token })) as Session;
}

export async function signOut(): Promise<void> {
  await send("DELETE", "/v1/session");
}

export const domainPath = (name: string, sub = "") => `/v1/domains/${encodeURIComponent(name)}${sub ? "/" + sub : ""}`;
export const volumePath = (pool: string, vol = "", sub = "") =>
  `/v1/pools/${encodeURIComponent(pool)}/volumes${vol ? "/" + encodeURIComponent(vol) : ""}${sub ? "/" + sub : ""}`;

/** Polls job `id` until it has ended, reporting each state on the way; a failed or cancelled job throws its error. */
export async function finishJob(id: number, progress: (job: Job) => void): Promise<Job> {
  for (;;) {
    const job = await get<Job>(`/v1/jobs/${id}`);
    progress(job);
    if (job.state === "completed") return job;
    if (job.state !== "running") throw new Error(job.error ?? `job ${id} ${job.state}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** Uploads a file's bytes into a volume with XMLHttpRequest, the one browser API that reports upload progress. */
export function upload(pool: string, vol: string, file: File, progress: (done: number, total: number) => void): Promise<Volume> {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", volumePath(pool, vol, "data"));
    xhr.setRequestHeader("X-Ferro-CSRF", "1");
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => progress(e.loaded, e.total || file.size);
    xhr.onload = () => {
      let body: { code?: string; message?: string } = {};
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // not JSON
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body as unknown as Volume);
      else reject(new ApiError(xhr.status, body.code ?? "http", body.message ?? `upload: HTTP ${xhr.status}`));
    };
    xhr.onerror = () => reject(new ApiError(0, "network", "upload: the connection to ferrod failed"));
    xhr.send(file);
  });
}

export interface Network {
  name: string;
  uuid: string;
  mode: "nat" | "isolated" | "bridge" | null;
  bridge: string | null;
  active: boolean;
  autostart: boolean;
  dnsmasq_pid: number | null;
  error: string | null;
  config: { ip?: string } | null;
}

export interface Lease {
  mac: string;
  ip: string;
  hostname: string | null;
  expiry: number | null;
}

export const networkPath = (name: string, sub = "") => `/v1/networks/${encodeURIComponent(name)}${sub ? "/" + sub : ""}`;

/** The DHCP leases of every running network, by MAC address (lower case). */
export async function leasesByMac(): Promise<Map<string, Lease>> {
  const networks = await get<Network[]>("/v1/networks");
  const all = await Promise.all(networks.filter((n) => n.active).map((n) => get<Lease[]>(networkPath(n.name, "leases")).catch(() => [])));
  return new Map(all.flat().map((l) => [l.mac.toLowerCase(), l]));
}
