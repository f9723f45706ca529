// A domain's snapshots (GET /v1/domains/NAME/snapshots) as a tree: take one (a job), revert to
// one and delete one, the last two confirmed in the page's dialog.

import { useEffect, useRef, useState } from "preact/hooks";
import { type Job, type Snapshot, domainPath, finishJob, get, send } from "../api";
import { ConfirmDialog, ErrorLine, jobProgress, Progress } from "../components";
import { useLive } from "../live";

/** The snapshots in tree order (each under its parent, oldest first) with their depth. */
function treeOrder(snapshots: Snapshot[]): [Snapshot, number][] {
  const byName = new Map(snapshots.map((s) => [s.name, s]));
  const out: [Snapshot, number][] = [];
  const visit = (s: Snapshot, depth: number) => {
    out.push([s, depth]);
    for (const child of s.children) {
      const c = byName.get(child);
      if (c) visit(c, depth + 1);
    }
  };
  for (const root of snapshots.filter((s) => s.parent === null || !byName.has(s.parent))) visit(root, 0);
  return out;
}

const snapshotPath = (domain: string, name = "", sub = "") => domainPath(domain, `snapshots${name ? "/" + encodeURIComponent(name) : ""}${sub ? "/" + sub : ""}`);

/** The form that takes a snapshot, in a modal dialog: a name and an optional description. */
export function TakeSnapshotDialog({ domain, onDone, onCancel }: { domain: string; onDone: (message: string) => void; onCancel: () => void }) {
  const ref = useRef<HTMLDialogElement>(null);
  const [name, setName] = useState(`snap-${new Date().toISOString().slice(0, 19).replace(/[-:T]/g, "")}`);
  const [description, setDescription] = useState("");
  const [job, setJob] = useState<Job | null>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => ref.current?.showModal(), []);
  const take = async (e: Event) => {
    e.preventDefault();
    setError(null);
    try {
      const started = (await send<Job>("POST", snapshotPath(domain), { name, description: description || null })) as Job;
      await finishJob(started.id, setJob);
      const taken = await get<Snapshot>(snapshotPath(domain, name));
      const pause = taken.pause_us === null ? "" : ` (guest paused ${(taken.pause_us / 1000).toFixed(1)} ms)`;
      onDone(`Snapshot ${name} taken${pause}`);
    } catch (err) {
      setJob(null);
      setError((err as Error).message);
    }
  };
  return (
    <dialog ref={ref} class="confirm" onCancel={onCancel} aria-label="Take a snapshot">
      <form onSubmit={take}>
        <fieldset disabled={job !== null && error === null}>
          <label>
            Snapshot name <input name="snapshot-name" required pattern="[A-Za-z0-9._\-]+" value={name} onInput={(e) => setName(e.currentTarget.value)} />
          </label>
          <label>
            Description <input name="snapshot-description" value={description} onInput={(e) => setDescription(e.currentTarget.value)} />
          </label>
        </fieldset>
        {job && <Progress done={jobProgress(job)[0]} total={jobProgress(job)[1]} label="Snapshot progress" />}
        <ErrorLine error={error} />
        <div class="buttons">
          <button type="submit" disabled={job !== null && error === null}>
            Create snapshot
          </button>
          <button type="button" onClick={onCancel}>
            Cancel
          </button>
        </div>
      </form>
    </dialog>
  );
}

interface Asking {
  snapshot: string;
  action: "revert" | "delete";
}

/** The snapshot table with Revert and Delete per snapshot; `changed` counts snapshots taken here. */
export function SnapshotList({ domain, admin, changed, onMessage }: { domain: string; admin: boolean; changed: number; onMessage: (m: string) => void }) {
  const live = useLive();
  const [snapshots, setSnapshots] = useState<Snapshot[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [asking, setAsking] = useState<Asking | null>(null);
  const [working, setWorking] = useState<{ snapshot: string; job: Job | null } | null>(null);
  const load = () => get<Snapshot[]>(snapshotPath(domain)).then(setSnapshots, (e) => setError((e as Error).message));
  useEffect(() => void load(), [domain, changed, live.eventCount]);
  const run = async ({ snapshot, action }: Asking) => {
    setAsking(null);
    setError(null);
    setWorking({ snapshot, job: null });
    try {
      if (action === "delete") {
        await send("DELETE", snapshotPath(domain, snapshot));
        onMessage(`Snapshot ${snapshot} deleted`);
      } else {
        const started = (await send<Job>("POST", snapshotPath(domain, snapshot, "revert"), {})) as Job;
        await finishJob(started.id, (job) => setWorking({ snapshot, job }));
        onMessage(`Reverted to ${snapshot}`);
      }
    } catch (err) {
      setError((err as Error).message);
    } finally {
      setWorking(null);
      await load();
    }
  };
  const question = (a: Asking) =>
    a.action === "revert"
      ? `Revert ${domain} to ${a.snapshot}: the domain goes back to that instant, memory and disks; everything since is lost unless a snapshot holds it.`
      : `Delete snapshot ${a.snapshot}: its saved state and its disk snapshots are removed; snapshots taken after it stay, under its parent.`;
  return (
    <>
      <ErrorLine error={error} />
      {asking && <ConfirmDialog text={question(asking)} onConfirm={() => run(asking)} onCancel={() => setAsking(null)} />}
      {working?.job && <Progress done={jobProgress(working.job)[0]} total={jobProgress(working.job)[1]} label={`Reverting to ${working.snapshot}`} />}
      {snapshots === null ? (
        <p>Loading…</p>
      ) : snapshots.length === 0 ? (
        <p>No snapshots.</p>
      ) : (
        <div class="table-scroll">
          <table>
            <thead>
              <tr>
                <th>Name</th>
                <th>Taken</th>
                <th>State</th>
                <th>Guest paused</th>
                <th>Description</th>
                <th></th>
              </tr>
            </thead>
            <tbody>
              {treeOrder(snapshots).map(([s, depth]) => (
                <tr data-snapshot={s.name}>
                  <td style={{ paddingLeft: `${0.5 + depth * 1.25}rem` }}>
                    {depth > 0 ? "└ " : ""}
                    {s.name}
                    {s.current && <span class="badge current"> current</span>}
                  </td>
                  <td>{new Date(s.created_ms).toLocaleString()}</td>
                  <td>{s.state === "shutoff" ? "shut off" : s.state}</td>
                  <td>{s.pause_us === null ? "–" : `${(s.pause_us / 1000).toFixed(1)} ms`}</td>
                  <td>{s.description ?? ""}</td>
                  <td class="row-actions">
                    <button disabled={!admin || working !== null} onClick={() => setAsking({ snapshot: s.name, action: "revert" })}>
                      Revert
                    </button>
                    <button class="danger" disabled={!admin || working !== null} onClick={() => setAsking({ snapshot: s.name, action: "delete" })}>
                      Delete
                    </button>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </>
  );
}
