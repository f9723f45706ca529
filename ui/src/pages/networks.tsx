// Virtual networks: define one (NAT or isolated, with a DHCP range), start, stop (after
// confirming), undefine a stopped one, and their DHCP leases.

import { useEffect, useState } from "preact/hooks";
import { type Lease, type Network, get, networkPath, send } from "../api";
import { ConfirmDialog, ErrorLine, Section, StateBadge } from "../components";
import { SAMPLE_MS, useLive } from "../live";

export function NetworksPage({ admin }: { admin: boolean }) {
  const live = useLive();
  const [networks, setNetworks] = useState<Network[] | null>(null);
  const [leases, setLeases] = useState<Map<string, Lease[]>>(new Map());
  const [error, setError] = useState<string | null>(null);
  const [stopping, setStopping] = useState<string | null>(null);
  const [deleting, setDeleting] = useState<string | null>(null);
  const [form, setForm] = useState({ name: "", mode: "nat", bridge: "", ip: "192.168.150.1/24", dhcpStart: "192.168.150.100", dhcpEnd: "192.168.150.200", autostart: true });
  const field = (key: keyof typeof form) => (e: Event) => {
    const target = e.currentTarget as HTMLInputElement;
    setForm({ ...form, [key]: target.type === "checkbox" ? target.checked : target.value });
  };
  const define = async (e: Event) => {
    e.preventDefault();
    setError(null);
    const q = (s: string) => JSON.stringify(s);
    const lines = [`name = ${q(form.name)}`, `mode = ${q(form.mode)}`, `bridge = ${q(form.bridge)}`, `ip = ${q(form.ip)}`];
    if (form.dhcpStart) lines.push("[dhcp]", `start = ${q(form.dhcpStart)}`, `end = ${q(form.dhcpEnd)}`);
    try {
      await send("POST", "/v1/networks", lines.join("\n") + "\n", "application/toml");
      if (form.autostart) await send("POST", networkPath(form.name, "autostart"), { enabled: true });
      setForm({ ...form, name: "", bridge: "" });
    } catch (err) {
      setError((err as Error).message);
    }
    await load();
  };
  const load = async () => {
    try {
      const list = await get<Network[]>("/v1/networks");
      const pairs = await Promise.all(list.filter((n) => n.active).map(async (n) => [n.name, await get<Lease[]>(networkPath(n.name, "leases")).catch(() => [])] as const));
      setNetworks(list);
      setLeases(new Map(pairs));
    } catch (e) {
      setError((e as Error).message);
    }
  };
  useEffect(() => {
    void load();
    const timer = setInterval(load, SAMPLE_MS * 5);
    return () => clearInterval(timer);
  }, [live.eventCount]);
  const act = async (name: string, action: string) => {
    setError(null);
    try {
      await send("POST", networkPath(name, action), {});
    } catch (e) {
      setError((e as Error).message);
    }
    await load();
  };
  return (
    <Section title="Networks" id="networks">
      <ErrorLine error={error} />
      {stopping && (
        <ConfirmDialog
          text={`Stop network ${stopping}: its bridge, firewall rules and DHCP go away; VMs on it lose their connection.`}
          onConfirm={() => {
            const name = stopping;
            setStopping(null);
            void act(name, "destroy");
          }}
          onCancel={() => setStopping(null)}
        />
      )}
      {deleting && (
        <ConfirmDialog
          text={`Delete network ${deleting}: its definition is removed (domains naming it cannot start until it is defined again).`}
          onConfirm={() => {
            const name = deleting;
            setDeleting(null);
            void send("DELETE", networkPath(name)).then(load, (e) => setError((e as Error).message));
          }}
          onCancel={() => setDeleting(null)}
        />
      )}
      {networks === null ? (
        <p>Loading…</p>
      ) : networks.length === 0 ? (
        <p>No networks.</p>
      ) : (
        networks.map((n) => (
          <article class="pool" data-network={n.name}>
            <h3>
              {n.name} <StateBadge state={n.active ? "running" : "shutoff"} />
            </h3>
            <p class="hint">
              {n.mode ?? "?"} network on bridge <span class="mono">{n.bridge ?? "?"}</span>
              {n.config?.ip && <> with gateway {n.config.ip}</>}
              {n.autostart && ", starts with the host"}
            </p>
            <ErrorLine error={n.error} />
            <div class="actions">
              <button disabled={!admin || n.active} onClick={() => act(n.name, "start")}>
                Start
              </button>
              <button class="danger" disabled={!admin || !n.active} onClick={() => setStopping(n.name)}>
                Stop
              </button>
              <button class="danger" disabled={!admin || n.active} onClick={() => setDeleting(n.name)}>
                Delete
              </button>
            </div>
            {n.active && (
              <div class="table-scroll">
                <table>
                  <thead>
                    <tr>
                      <th>MAC</th>
                      <th>Address</th>
                      <th>Host name</th>
                      <th>Expires</th>
                    </tr>
                  </thead>
                  <tbody>
                    {(leases.get(n.name) ?? []).map((l) => (
                      <tr>
                        <td class="mono">{l.mac}</td>
                        <td class="mono">{l.ip}</td>
                        <td>{l.hostname ?? "–"}</td>
                        <td>{l.expiry ? new Date(l.expiry * 1000).toLocaleString() : "never"}</td>
                      </tr>
                    ))}
                  </tbody>
                </table>
                {(leases.get(n.name) ?? []).length === 0 && <p class="hint">No DHCP leases.</p>}
              </div>
            )}
          </article>
        ))
      )}
      <h3>New network</h3>
      <form class="create" onSubmit={define}>
        <fieldset disabled={!admin}>
          <label>
            Network name <input name="network-name" required pattern="[A-Za-z0-9][A-Za-z0-9_.\-]*" value={form.name} onInput={field("name")} />
          </label>
          <label>
            Mode
            <select name="network-mode" value={form.mode} onChange={field("mode")}>
              <option value="nat">NAT (guests reach out through the host)</option>
              <option value="isolated">Isolated (guests and the host only)</option>
            </select>
          </label>
          <label>
            Bridge <input name="network-bridge" required maxLength={15} placeholder="fvbr1" value={form.bridge} onInput={field("bridge")} />
          </label>
          <label>
            Gateway address <input name="network-ip" required value={form.ip} onInput={field("ip")} />
          </label>
          <label>
            DHCP from <input name="network-dhcp-start" value={form.dhcpStart} onInput={field("dhcpStart")} />
          </label>
          <label>
            DHCP to <input name="network-dhcp-end" value={form.dhcpEnd} onInput={field("dhcpEnd")} />
          </label>
          <label class="check">
            <input name="network-autostart" type="checkbox" checked={form.autostart} onChange={field("autostart")} /> Start with the host
          </label>
          <button type="submit">Define network</button>
        </fieldset>
      </form>
    </Section>
  );
}
