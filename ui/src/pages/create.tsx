// The create-VM form: writes a TOML definition (the same one `ferro define` takes), makes a new
// volume first when asked, defines the domain and optionally starts it. Its NIC goes on one of
// ferrod's networks (the `default` one when it exists), a tap of the user's, or nowhere.

import { useEffect, useState } from "preact/hooks";
import { type Network, type Pool, type Volume, domainPath, get, send, volumePath } from "../api";
import { ErrorLine, Section } from "../components";
import { refresh } from "../live";

type Boot = "guest" | "kernel" | "disk";
type DiskChoice = "none" | "existing" | "new";

/** A TOML basic string: JSON's escapes are TOML's. */
const str = (s: string) => JSON.stringify(s);

export function CreatePage({ admin }: { admin: boolean }) {
  const [form, setForm] = useState({
    name: "",
    memory: "256M",
    vcpus: "1",
    boot: "guest" as Boot,
    guest: "idle",
    kernel: "",
    initrd: "",
    cmdline: "console=ttyS0",
    disk: "none" as DiskChoice,
    pool: "",
    volume: "",
    size: "1G",
    format: "qcow2",
    /** "none", "tap", or "network:NAME". */
    nic: "none",
    tap: "",
    start: true,
  });
  const [pools, setPools] = useState<Pool[]>([]);
  const [volumes, setVolumes] = useState<Volume[]>([]);
  const [networks, setNetworks] = useState<Network[]>([]);
  const [error, setError] = useState<string | null>(null);
  const [done, setDone] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const set = (key: keyof typeof form) => (e: Event) => {
    const target = e.currentTarget as HTMLInputElement;
    setForm({ ...form, [key]: target.type === "checkbox" ? target.checked : target.value });
  };
  useEffect(() => {
    get<Pool[]>("/v1/pools").then((p) => {
      setPools(p);
      if (p.length && !form.pool) setForm((f) => ({ ...f, pool: p[0].name }));
    }, () => setPools([]));
  }, []);
  useEffect(() => {
    // Like `ferro create`: the `default` network when there is one.
    get<Network[]>("/v1/networks").then((n) => {
      setNetworks(n);
      if (n.some((x) => x.name === "default")) setForm((f) => (f.nic === "none" ? { ...f, nic: "network:default" } : f));
    }, () => setNetworks([]));
  }, []);
  useEffect(() => {
    if (form.pool) get<Volume[]>(volumePath(form.pool)).then(setVolumes, () => setVolumes([]));
  }, [form.pool]);

  const toml = () => {
    const lines = [`name = ${str(form.name)}`, `memory = ${str(form.memory)}`, `vcpus = ${Number(form.vcpus)}`, "[boot]"];
    if (form.boot === "guest") lines.push(`guest = ${str(form.guest)}`);
    if (form.boot === "disk") lines.push(`from = "disk"`);
    if (form.boot === "kernel") {
      lines.push(`kernel = ${str(form.kernel)}`);
      if (form.initrd) lines.push(`initrd = ${str(form.initrd)}`);
    }
    if (form.boot !== "guest" && form.cmdline) lines.push(`cmdline = ${str(form.cmdline)}`);
    if (form.disk !== "none") {
      const volume = form.disk === "new" ? `${form.name}-disk` : form.volume;
      const format = form.disk === "new" ? form.format : (volumes.find((v) => v.name === volume)?.format ?? "raw");
      lines.push("[[disk]]", `pool = ${str(form.pool)}`, `volume = ${str(volume)}`, `format = ${str(format)}`);
    }
    if (form.nic === "tap" && form.tap) lines.push("[[nic]]", `tap = ${str(form.tap)}`);
    if (form.nic.startsWith("network:")) lines.push("[[nic]]", `network = ${str(form.nic.slice("network:".length))}`);
    return lines.join("\n") + "\n";
  };

  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    setDone(null);
    try {
      if (form.disk === "new") {
        await send("POST", volumePath(form.pool), { name: `${form.name}-disk`, capacity: form.size, format: form.format });
      }
      await send("POST", "/v1/domains", toml(), "application/toml");
      if (form.start) await send("POST", domainPath(form.name, "start"), {});
      setDone(form.name);
      await refresh();
    } catch (err) {
      setError((err as Error).message);
    } finally {
      setBusy(false);
    }
  };

  return (
    <Section title="Create a virtual machine" id="create">
      {!admin && <p class="hint">Signed in read-only: creating needs an admin token.</p>}
      <form class="create" onSubmit={submit}>
        <fieldset disabled={!admin || busy}>
          <label>
            Name <input name="name" required pattern="[A-Za-z0-9][A-Za-z0-9_.\-]*" value={form.name} onInput={set("name")} />
          </label>
          <label>
            Memory <input name="memory" required value={form.memory} onInput={set("memory")} />
          </label>
          <label>
            vCPUs <input name="vcpus" type="number" min={1} max={255} required value={form.vcpus} onInput={set("vcpus")} />
          </label>
          <label>
            Boot
            <select name="boot" value={form.boot} onChange={set("boot")}>
              <option value="guest">Built-in test guest</option>
              <option value="kernel">Kernel and initrd</option>
              <option value="disk">Image: the kernel on the first disk</option>
            </select>
          </label>
          {form.boot === "guest" && (
            <label>
              Test guest <input name="guest" required value={form.guest} onInput={set("guest")} />
            </label>
          )}
          {form.boot === "kernel" && (
            <>
              <label>
                Kernel <input name="kernel" required placeholder="/srv/vmlinux" value={form.kernel} onInput={set("kernel")} />
              </label>
              <label>
                Initrd <input name="initrd" placeholder="/srv/initrd.cpio" value={form.initrd} onInput={set("initrd")} />
              </label>
            </>
          )}
          {form.boot !== "guest" && (
            <label>
              Kernel command line <input name="cmdline" value={form.cmdline} onInput={set("cmdline")} />
            </label>
          )}
          <label>
            Disk
            <select name="disk" value={form.disk} onChange={set("disk")}>
              <option value="none">No disk</option>
              <option value="existing">An existing volume</option>
              <option value="new">A new volume</option>
            </select>
          </label>
          {form.disk !== "none" && (
            <label>
              Pool
              <select name="pool" value={form.pool} onChange={set("pool")} required>
                {pools.map((p) => (
                  <option value={p.name}>{p.name}</option>
                ))}
              </select>
            </label>
          )}
          {form.disk === "existing" && (
            <label>
              Volume
              <select name="volume" value={form.volume} onChange={set("volume")} required>
                <option value="">choose…</option>
                {volumes.map((v) => (
                  <option value={v.name}>{v.name}</option>
                ))}
              </select>
            </label>
          )}
          {form.disk === "new" && (
            <>
              <label>
                Size <input name="size" required value={form.size} onInput={set("size")} />
              </label>
              <label>
                Format
                <select name="format" value={form.format} onChange={set("format")}>
                  <option value="qcow2">qcow2</option>
                  <option value="raw">raw</option>
                </select>
              </label>
            </>
          )}
          <label>
            Network
            <select name="nic" value={form.nic} onChange={set("nic")}>
              <option value="none">No network</option>
              {networks.map((n) => (
                <option value={`network:${n.name}`}>
                  {n.name} ({n.mode ?? "?"}
                  {n.active ? "" : ", stopped"})
                </option>
              ))}
              <option value="tap">A tap device of my own</option>
            </select>
          </label>
          {form.nic === "tap" && (
            <label>
              Tap device <input name="tap" required placeholder="tap0" value={form.tap} onInput={set("tap")} />
            </label>
          )}
          <label class="check">
            <input name="start" type="checkbox" checked={form.start} onChange={set("start")} /> Start it now
          </label>
          <button type="submit">Create</button>
        </fieldset>
      </form>
      <ErrorLine error={error} />
      {done && (
        <p class="ok" role="status">
          Created <a href={`#/domains/${encodeURIComponent(done)}`}>{done}</a>.
        </p>
      )}
    </Section>
  );
}
