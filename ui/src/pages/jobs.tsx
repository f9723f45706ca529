// Jobs with their progress, and the live event feed.

import { useEffect, useState } from "preact/hooks";
import { type Job, get, send } from "../api";
import { ErrorLine, jobProgress, Progress, Section } from "../components";
import { SAMPLE_MS, useLive } from "../live";

export function JobsPage({ admin }: { admin: boolean }) {
  const live = useLive();
  const [jobs, setJobs] = useState<Job[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const load = () => get<Job[]>("/v1/jobs").then(setJobs, (e) => setError((e as Error).message));
  useEffect(() => {
    void load();
    const timer = setInterval(load, SAMPLE_MS);
    return () => clearInterval(timer);
  }, [live.eventCount]);
  const cancel = (id: number) => send("POST", `/v1/jobs/${id}/cancel`, {}).then(load, (e) => setError((e as Error).message));
  return (
    <Section title="Jobs" id="jobs">
      <ErrorLine error={error} />
      {jobs === null ? (
        <p>Loading…</p>
      ) : jobs.length === 0 ? (
        <p>No jobs.</p>
      ) : (
        <div class="table-scroll">
          <table>
            <thead>
              <tr>
                <th>#</th>
                <th>Kind</th>
                <th>From</th>
                <th>To</th>
                <th>State</th>
                <th>Progress</th>
                <th />
              </tr>
            </thead>
            <tbody>
              {[...jobs].reverse().map((j) => {
                // A completed job's counters need not reach their total (the browser test's clone
                // of a new 8 MiB volume ended short of it), so completed shows a full bar.
                const [done, total] = jobProgress(j);
                return (
                  <tr data-job={j.id}>
                    <td>{j.id}</td>
                    <td>{j.kind}</td>
                    <td class="mono">{j.source}</td>
                    <td class="mono">{j.target}</td>
                    <td title={j.error ?? ""}>{j.state}</td>
                    <td>{j.state === "completed" ? <Progress done={1} total={1} label={`job ${j.id}`} /> : <Progress done={done} total={total} label={`job ${j.id}`} />}</td>
                    <td>{j.state === "running" && admin && <button onClick={() => cancel(j.id)}>Cancel</button>}</td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </div>
      )}
    </Section>
  );
}

export function EventsPage() {
  const live = useLive();
  return (
    <Section title="Events" id="events">
      {live.events.length === 0 ? (
        <p>No events yet.</p>
      ) : (
        <ol class="events" reversed>
          {live.events.map((e) => (
            <li data-seq={e.seq}>
              <time>{new Date(e.time_ms).toLocaleTimeString()}</time> {e.object} <strong>{e.name}</strong> {e.kind}
              {e.detail && <span class="hint"> {e.detail}</span>}
            </li>
          ))}
        </ol>
      )}
    </Section>
  );
}
