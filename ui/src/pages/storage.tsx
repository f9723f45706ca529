// Pools and their volumes: create, delete, and upload a file into a new volume with a progress bar.

import { useEffect, useState } from "preact/hooks";
import { type Pool, type Volume, get, send, upload, volumePath } from "../api";
import { bytes, ConfirmDialog, ErrorLine, Progress, Section } from "../components";
import { useLive } from "../live";

export function StoragePage({ admin }: { admin: boolean }) {
  const live = useLive();
  const [pools, setPools] = useState<Pool[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [pool, setPool] = useState({ name: "", target: "" });
  const load = () => get<Pool[]>("/v1/pools").then(setPools, (e) => setError((e as Error).message));
  useEffect(() => void load(), [live.eventCount]);
  const create = async (e: Event) => {
    e.preventDefault();
    setError(null);
    try {
      await send("POST", "/v1/pools", { name: pool.name, type: "dir", target: pool.target });
      await send("POST", `/v1/pools/${encodeURIComponent(pool.name)}/build`, {});
      await send("POST", `/v1/pools/${encodeURIComponent(pool.name)}/start`, {});
      setPool({ name: "", target: "" });
    } catch (err) {
      setError((err as Error).message);
    }
    await load();
  };
  return (
    <>
      <Section title="Storage pools" id="pools">
        <ErrorLine error={error} />
        {pools === null ? <p>Loading…</p> : pools.length === 0 ? <p>No pools.</p> : pools.map((p) => <PoolView pool={p} admin={admin} reload={load} />)}
      </Section>
      <Section title="New pool" id="new-pool">
        <form class="inline" onSubmit={create}>
          <fieldset disabled={!admin}>
            <label>
              Name <input name="pool-name" required value={pool.name} onInput={(e) => setPool({ ...pool, name: e.currentTarget.value })} />
            </label>
            <label>
              Directory <input name="pool-target" required placeholder="/var/lib/ferrovisor/images" value={pool.target} onInput={(e) => setPool({ ...pool, target: e.currentTarget.value })} />
            </label>
            <button type="submit">Create pool</button>
          </fieldset>
        </form>
      </Section>
    </>
  );
}

function PoolView({ pool, admin, reload }: { pool: Pool; admin: boolean; reload: () => void }) {
  const [volumes, setVolumes] = useState<Volume[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [vol, setVol] = useState({ name: "", capacity: "1G", format: "qcow2" });
  const [deleting, setDeleting] = useState<string | null>(null);
  const [uploading, setUploading] = useState<{ name: string; done: number; total: number } | null>(null);
  const load = () => (pool.active ? get<Volume[]>(volumePath(pool.name)).then(setVolumes, (e) => setError((e as Error).message)) : setVolumes([]));
  useEffect(() => void load(), [pool]);
  const act = async (work: () => Promise<unknown>) => {
    setError(null);
    try {
      await work();
    } catch (e) {
      setError((e as Error).message);
    }
    await load();
    reload();
  };
  const create = (e: Event) => {
    e.preventDefault();
    void act(() => send("POST", volumePath(pool.name), vol));
  };
  const uploadFile = (e: Event) => {
    const input = e.currentTarget as HTMLInputElement;
    const file = input.files?.[0];
    if (!file) return;
    const name = file.name.replace(/[^A-Za-z0-9_.-]/g, "_");
    void act(async () => {
      setUploading({ name, done: 0, total: file.size });
      try {
        await send("POST", volumePath(pool.name), { name, capacity: String(file.size), format: "raw" });
        await upload(pool.name, name, file, (done, total) => setUploading({ name, done, total }));
      } finally {
        setUploading(null);
        input.value = "";
      }
    });
  };
  return (
    <article class="pool" data-pool={pool.name}>
      <h3>
        {pool.name} <span class={`badge ${pool.active ? "state-running" : "state-shutoff"}`}>{pool.active ? "active" : "inactive"}</span>
      </h3>
      <p class="hint">
        {pool.type} pool in <span class="mono">{pool.target}</span>
        {pool.capacity !== null && `: ${bytes(pool.available)} free of ${bytes(pool.capacity)}`}
      </p>
      <ErrorLine error={error} />
      {deleting && (
        <ConfirmDialog
          text={`Delete volume ${deleting}: its data is gone for good.`}
          onConfirm={() => {
            const name = deleting;
            setDeleting(null);
            void act(() => send("DELETE", volumePath(pool.name, name)));
          }}
          onCancel={() => setDeleting(null)}
        />
      )}
      {volumes && volumes.length > 0 && (
        <div class="table-scroll">
          <table>
            <thead>
              <tr>
                <th>Volume</th>
                <th>Format</th>
                <th>Size</th>
                <th>On disk</th>
                <th />
              </tr>
            </thead>
            <tbody>
              {volumes.map((v) => (
                <tr data-volume={v.name}>
                  <td>{v.name}</td>
                  <td>{v.format}</td>
                  <td>{bytes(v.capacity)}</td>
                  <td>{bytes(v.allocation)}</td>
                  <td>
                    <button class="danger" disabled={!admin} onClick={() => setDeleting(v.name)}>
                      Delete
                    </button>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {pool.active && (
        <form class="inline" onSubmit={create}>
          <fieldset disabled={!admin}>
            <label>
              Volume <input name="volume-name" required value={vol.name} onInput={(e) => setVol({ ...vol, name: e.currentTarget.value })} />
            </label>
            <label>
              Size <input name="volume-size" required value={vol.capacity} onInput={(e) => setVol({ ...vol, capacity: e.currentTarget.value })} />
            </label>
            <label>
              Format
              <select name="volume-format" value={vol.format} onChange={(e) => setVol({ ...vol, format: e.currentTarget.value })}>
                <option value="qcow2">qcow2</option>
                <option value="raw">raw</option>
              </select>
            </label>
            <button type="submit">Create volume</button>
            <label class="upload">
              Upload a file <input type="file" name="upload" onChange={uploadFile} />
            </label>
          </fieldset>
        </form>
      )}
      {uploading && (
        <div class="uploading">
          Uploading {uploading.name} <Progress done={uploading.done} total={uploading.total} label={`upload of ${uploading.name}`} />
        </div>
      )}
    </article>
  );
}
