// The host overview and the domain list.

import { bytes, ErrorLine, percent, Section, since, StateBadge } from "../components";
import { useLive } from "../live";

export function Overview() {
  const live = useLive();
  const host = live.host;
  return (
    <>
      <ErrorLine error={live.error} />
      <Section title="Host" id="host">
        {host ? (
          <dl class="cards">
            <div>
              <dt>Host</dt>
              <dd>{host.hostname}</dd>
            </div>
            <div>
              <dt>CPUs</dt>
              <dd>
                {host.cpus} <small>load {host.load.map((l) => l.toFixed(2)).join(" ")}</small>
              </dd>
            </div>
            <div>
              <dt>Memory</dt>
              <dd>
                {bytes(host.memory_total_bytes - host.memory_available_bytes)} used of {bytes(host.memory_total_bytes)}
              </dd>
            </div>
            <div>
              <dt>VMs</dt>
              <dd data-testid="vm-counts">
                {host.domains.running} running, {host.domains.paused} paused, {host.domains.shutoff + host.domains.crashed} stopped ({host.domains.total} in all)
              </dd>
            </div>
            <div>
              <dt>ferrod</dt>
              <dd>version {host.version}</dd>
            </div>
          </dl>
        ) : (
          <p>Loading…</p>
        )}
      </Section>
      <Section title="Virtual machines" id="domains">
        {live.domains === null ? (
          <p>Loading…</p>
        ) : live.domains.length === 0 ? (
          <p>
            No domains yet: <a href="#/create">create one</a>.
          </p>
        ) : (
          <div class="table-scroll">
            <table class="domains">
              <thead>
                <tr>
                  <th>Name</th>
                  <th>State</th>
                  <th>vCPUs</th>
                  <th>Memory</th>
                  <th>CPU</th>
                  <th>Up</th>
                </tr>
              </thead>
              <tbody>
                {live.domains.map((d) => {
                  const cpu = live.history.get(d.name)?.at(-1)?.cpu_percent;
                  const active = d.state === "running" || d.state === "paused";
                  return (
                    <tr data-domain={d.name}>
                      <td>
                        <a href={`#/domains/${encodeURIComponent(d.name)}`}>{d.name}</a>
                      </td>
                      <td>
                        <StateBadge state={d.state} />
                      </td>
                      <td>{d.vcpus ?? "–"}</td>
                      <td>{bytes(d.memory_bytes)}</td>
                      <td>{active && cpu !== undefined ? percent(cpu) : "–"}</td>
                      <td>{active ? since(d.started_ms) : "–"}</td>
                    </tr>
                  );
                })}
              </tbody>
            </table>
          </div>
        )}
      </Section>
    </>
  );
}
