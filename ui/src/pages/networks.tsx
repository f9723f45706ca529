// Virtual networks: start, stop (after confirming) and their DHCP leases.

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
      {networks === null ? (
        <p>Loading…</p>
      ) : networks.length === 0 ? (
        <p>No networks (define one with `ferro net-define`).</p>
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
    </Section>
  );
}
