// One domain: its actions, live graphs, disks, NICs and the console.

import { useEffect, useState } from "preact/hooks";
import { type Lease, domainPath, leasesByMac, send } from "../api";
import { bytes, ConfirmDialog, ErrorLine, Graph, percent, rate, Section, StateBadge } from "../components";
import { Console } from "../console";
import { refresh, useLive } from "../live";
import { SnapshotList, TakeSnapshotDialog } from "./snapshots";

interface Action {
  label: string;
  /** The API action (POST /v1/domains/NAME/ACTION), or "delete". */
  action: string;
  enabled: (state: string) => boolean;
  /** Asks in the in-page dialog first. */
  confirm?: string;
}

const active = (s: string) => s === "running" || s === "paused";
const actions: Action[] = [
  { label: "Start", action: "start", enabled: (s) => s === "shutoff" || s === "crashed" },
  { label: "Shut down", action: "shutdown", enabled: (s) => s === "running" },
  { label: "Force off", action: "destroy", enabled: active, confirm: "Force off: the guest stops at once, like pulling the plug. Unsaved data in the guest is lost." },
  { label: "Reboot", action: "reboot", enabled: active, confirm: "Reboot: the guest is reset at once." },
  { label: "Pause", action: "suspend", enabled: (s) => s === "running" },
  { label: "Resume", action: "resume", enabled: (s) => s === "paused" },
  { label: "Delete", action: "delete", enabled: (s) => !active(s), confirm: "Delete: the definition is removed (its volumes stay in their pool)." },
];

export function DomainPage({ name, admin }: { name: string; admin: boolean }) {
  const live = useLive();
  const [asking, setAsking] = useState<Action | null>(null);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const [console, setConsole] = useState(false);
  const [snapshotting, setSnapshotting] = useState(false);
  const [snapshotsTaken, setSnapshotsTaken] = useState(0);
  const [message, setMessage] = useState<string | null>(null);
  const [leases, setLeases] = useState<Map<string, Lease>>(new Map());
  useEffect(() => {
    leasesByMac().then(setLeases, () => setLeases(new Map()));
  }, [name, live.eventCount]);
  const domain = live.domains?.find((d) => d.name === name);
  if (live.domains !== null && !domain) {
    return (
      <p>
        No domain named {name}. <a href="#/">Back to the list</a>
      </p>
    );
  }
  if (!domain) return <p>Loading…</p>;
  const run = async (a: Action) => {
    setAsking(null);
    setBusy(true);
    setError(null);
    try {
      if (a.action === "delete") {
        await send("DELETE", domainPath(name));
        location.hash = "#/";
      } else {
        await send("POST", domainPath(name, a.action), {});
      }
    } catch (e) {
      setError((e as Error).message);
    } finally {
      setBusy(false);
      await refresh();
    }
  };
  const history = live.history.get(name) ?? [];
  const stats = live.stats.get(name);
  const series = (f: (s: (typeof history)[number]) => number) => history.map((s) => ({ time_ms: s.time_ms, value: f(s) }));
  const config = domain.config;
  return (
    <>
      <h1>
        {name} <StateBadge state={domain.state} />
      </h1>
      <div class="actions" role="toolbar" aria-label="Domain actions">
        {actions.map((a) => (
          <button disabled={!admin || busy || !a.enabled(domain.state)} class={a.confirm ? "danger" : ""} onClick={() => (a.confirm ? setAsking(a) : run(a))}>
            {a.label}
          </button>
        ))}
        <button disabled={!admin || busy || domain.state === "crashed"} onClick={() => setSnapshotting(true)}>
          Take snapshot
        </button>
        <button disabled={!admin || !active(domain.state)} onClick={() => setConsole(true)} title={admin ? "" : "The console is for admin tokens"}>
          Console
        </button>
      </div>
      {!admin && <p class="hint">Signed in read-only: you can look at everything and change nothing.</p>}
      <ErrorLine error={error ?? domain.error ?? (domain.crash && domain.state === "crashed" ? `crashed: ${domain.crash.reason}` : null)} />
      {asking && <ConfirmDialog text={asking.confirm!} onConfirm={() => run(asking)} onCancel={() => setAsking(null)} />}
      {message && (
        <p class="ok" role="status">
          {message}
        </p>
      )}
      {snapshotting && (
        <TakeSnapshotDialog
          domain={name}
          onCancel={() => setSnapshotting(false)}
          onDone={(m) => {
            setSnapshotting(false);
            setSnapshotsTaken(snapshotsTaken + 1);
            setMessage(m);
          }}
        />
      )}
      {console && active(domain.state) && <Console name={name} onClose={() => setConsole(false)} />}
      <Section title="Load" id="graphs">
        {active(domain.state) ? (
          <div class="graphs">
            <Graph metric="cpu" title="CPU" points={series((s) => s.cpu_percent)} format={percent} max={100} />
            <Graph metric="memory" title="Memory (VMM resident)" points={series((s) => s.rss_bytes)} format={bytes} max={domain.memory_bytes ?? 0} />
            <Graph metric="disk" title="Disk read + write" points={series((s) => s.disk_bytes_per_s)} format={rate} />
            <Graph metric="network" title="Network rx + tx" points={series((s) => s.net_bytes_per_s)} format={rate} />
          </div>
        ) : (
          <p>Not running.</p>
        )}
      </Section>
      <Section title="Configuration" id="config">
        <dl class="cards">
          <div>
            <dt>vCPUs</dt>
            <dd>{domain.vcpus ?? "–"}</dd>
          </div>
          <div>
            <dt>Memory</dt>
            <dd>{bytes(domain.memory_bytes)}</dd>
          </div>
          <div>
            <dt>Boot</dt>
            <dd>{config ? (config.boot.guest ? `test guest ${config.boot.guest}` : config.boot.from === "disk" ? "from the first disk" : config.boot.kernel) : "–"}</dd>
          </div>
          <div>
            <dt>Autostart</dt>
            <dd>{domain.autostart ? "yes" : "no"}</dd>
          </div>
          <div>
            <dt>UUID</dt>
            <dd class="mono">{domain.uuid}</dd>
          </div>
        </dl>
      </Section>
      <Section title="Disks" id="disks">
        {(config?.disk ?? []).length === 0 ? (
          <p>No disks.</p>
        ) : (
          <div class="table-scroll">
            <table>
              <thead>
                <tr>
                  <th>Device</th>
                  <th>Source</th>
                  <th>Format</th>
                  <th>Read</th>
                  <th>Written</th>
                </tr>
              </thead>
              <tbody>
                {(config?.disk ?? []).map((d, i) => {
                  const s = stats?.disks[i];
                  return (
                    <tr>
                      <td>{s?.id ?? `disk ${i}`}</td>
                      <td class="mono">{d.path ?? `${d.pool}/${d.volume}`}</td>
                      <td>
                        {d.format}
                        {d.readonly ? ", read-only" : ""}
                      </td>
                      <td>{s ? bytes(s.read_bytes) : "–"}</td>
                      <td>{s ? bytes(s.write_bytes) : "–"}</td>
                    </tr>
                  );
                })}
              </tbody>
            </table>
          </div>
        )}
      </Section>
      <Section title="Network interfaces" id="nics">
        {(config?.nic ?? []).length === 0 ? (
          <p>No network interfaces.</p>
        ) : (
          <div class="table-scroll">
            <table>
              <thead>
                <tr>
                  <th>Device</th>
                  <th>Attached to</th>
                  <th>MAC</th>
                  <th>Address</th>
                  <th>Received</th>
                  <th>Sent</th>
                </tr>
              </thead>
              <tbody>
                {(config?.nic ?? []).map((n, i) => {
                  const s = stats?.nics[i];
                  const mac = s?.mac ?? n.mac;
                  const lease = mac ? leases.get(mac.toLowerCase()) : undefined;
                  return (
                    <tr>
                      <td>{s?.id ?? `nic ${i}`}</td>
                      <td>{n.network ? `network ${n.network}` : n.bridge ? `bridge ${n.bridge}` : `tap ${n.tap}`}</td>
                      <td class="mono">{mac ?? "assigned at start"}</td>
                      <td class="mono">{lease ? lease.ip : "–"}</td>
                      <td>{s ? bytes(s.rx_bytes) : "–"}</td>
                      <td>{s ? bytes(s.tx_bytes) : "–"}</td>
                    </tr>
                  );
                })}
              </tbody>
            </table>
          </div>
        )}
      </Section>
      <Section title="Snapshots" id="snapshots">
        <SnapshotList domain={name} admin={admin} changed={snapshotsTaken} onMessage={setMessage} />
      </Section>
    </>
  );
}
