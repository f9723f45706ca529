// The web UI in a real Chromium (Debian's, headless) against a real ferrod running real VMMs.
// Started by crates/manager/tests/ui.rs, which passes:
//   FERRO_UI_URL      the listener (http://127.0.0.1:PORT/)
//   FERRO_ADMIN_TOKEN, FERRO_READONLY_TOKEN
//   FERRO_CLI, FERRO_HOME   the ferro binary and the daemon's home, to check what the UI did
//   FERRO_DOMAIN      a running domain with the `idle` test guest (echoes typed bytes)
//   FERRO_POOL, FERRO_POOL_DIR   an active dir pool and its directory
//   FERRO_JOB         the id of a finished copy job
//   FERRO_SHOTS       where screenshots go
// Exits non-zero with the reason on the first failed check.

import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (run through crates/manager/tests/ui.rs)`);
  return value;
};
const url = env("FERRO_UI_URL");
const domain = env("FERRO_DOMAIN");
const shots = env("FERRO_SHOTS");
mkdirSync(shots, { recursive: true });

const ferro = (...args) =>
  execFileSync(env("FERRO_CLI"), args, { env: { ...process.env, FERRO_HOME: env("FERRO_HOME") }, encoding: "utf8" }).trim();

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
  console.log(`ok: ${what}`);
}

/** Polls `probe` until it returns true (ferro's view catches up with a click). */
async function until(what, probe, seconds = 30) {
  const end = Date.now() + seconds * 1000;
  for (;;) {
    let last;
    try {
      if (await probe()) return check(true, what);
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for: ${what}${last ? ` (${last.message})` : ""}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

const browser = await chromium.launch({
  executablePath: process.env.FERRO_CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
});

/** A fresh browser context (its own cookies) whose console errors are collected. */
async function openPage(viewport) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  const errors = [];
  let signedIn = false;
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    // The one expected failure: the page asks GET /v1/session who is signed in, and before
    // signing in ferrod answers 401, which Chromium logs as a failed resource.
    const probe = !signedIn && m.location().url.endsWith("/v1/session") && m.text().includes("401");
    if (!probe) errors.push(`console: ${m.text()} (${m.location().url})`);
  });
  page.signIn = async (token) => {
    await page.goto(url);
    await page.getByLabel("Token").fill(token);
    signedIn = true;
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("heading", { name: "Virtual machines" }).waitFor();
  };
  page.errors = errors;
  return { context, page };
}

const state = () => ferro("domstate", domain);
const row = (page, name) => page.locator(`tr[data-domain="${name}"]`);

try {
  // --- admin at 1280x800 ---
  const { context, page } = await openPage({ width: 1280, height: 800 });
  await page.goto(url);
  // The page draws the form once it has asked ferrod who the visitor is: wait for it
  // (isVisible does not wait, and on a loaded host the form came a moment after the load event).
  await page.getByRole("button", { name: "Sign in" }).waitFor({ state: "visible" });
  check(await page.getByRole("button", { name: "Sign in" }).isVisible(), "an unsigned visitor sees the sign-in form");
  await page.getByLabel("Token").fill("not-the-token-of-this-ferrod");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("alert").filter({ hasText: "wrong token" }).waitFor();
  check(true, "a wrong token is refused with ferrod's message");
  page.errors.length = 0; // the 401 of the wrong token is expected
  await page.signIn(env("FERRO_ADMIN_TOKEN"));
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "ferro_session");
  check(session && session.httpOnly && session.sameSite === "Strict", "the session cookie is HttpOnly and SameSite=Strict");

  await row(page, domain).getByText("running").waitFor();
  check(true, `the list shows ${domain} running`);
  const counts = await page.getByTestId("vm-counts").textContent();
  check(/1 running/.test(counts), `the host overview counts the running VM (${counts})`);
  check(/version \d+\.\d+\.\d+/.test(await page.locator("#host").textContent()), "the host overview shows ferrod's version");
  await page.screenshot({ path: `${shots}/overview.png` });

  // The domain page: graphs fill with samples.
  await row(page, domain).getByRole("link", { name: domain }).click();
  await page.getByRole("heading", { name: domain }).waitFor();
  await until("the CPU graph has at least 3 data points", async () => (await page.locator('svg.graph[data-metric="cpu"] circle').count()) >= 3);
  const values = await page.locator('svg.graph[data-metric="memory"] circle').evaluateAll((cs) => cs.map((c) => Number(c.dataset.value)));
  check(values.length >= 3 && values.every((v) => v > 0), `the memory graph's points carry the VMM's resident size (${values.at(-1)} bytes)`);

  // The console: the guest's output, and a typed line reaches the guest (idle echoes each byte).
  await page.getByRole("button", { name: "Console" }).click();
  await page.getByTestId("console-status").filter({ hasText: "connected" }).waitFor();
  await page.locator(".xterm-helper-textarea").focus();
  await page.keyboard.type("ferro\r");
  const terminal = page.getByTestId("terminal");
  await until("typed keys reach the guest and its echo shows in the terminal", async () => {
    const text = await terminal.textContent();
    return ["echo: f", "echo: e", "echo: r", "echo: o"].every((s) => text.includes(s));
  });
  await page.screenshot({ path: `${shots}/domain.png`, fullPage: true });
  await page.getByRole("button", { name: "Close console" }).click();

  // Snapshots: take two in the page's form, revert to the first (confirmed), delete the second;
  // ferro snapshot-list agrees at each step, and the domain keeps running after the revert.
  const snapshots = () => JSON.parse(ferro("snapshot-list", domain, "--json"));
  for (const name of ["ui-one", "ui-two"]) {
    await page.getByRole("button", { name: "Take snapshot" }).click();
    await page.getByLabel("Snapshot name").fill(name);
    await page.getByLabel("Description").fill(`taken in the browser: ${name}`);
    await page.getByRole("button", { name: "Create snapshot" }).click();
    await page.getByRole("status").filter({ hasText: `Snapshot ${name} taken (guest paused` }).waitFor();
    await page.locator(`tr[data-snapshot="${name}"]`).waitFor();
  }
  const taken = snapshots();
  check(
    taken.length === 2 && taken[1].parent === "ui-one" && taken[1].current && taken[0].description === "taken in the browser: ui-one",
    "Take snapshot makes snapshots ferro snapshot-list shows, the second under the first and current",
  );
  check((await page.locator('tr[data-snapshot="ui-two"]').textContent()).includes("current"), "the page marks the current snapshot");
  await page.locator('tr[data-snapshot="ui-one"]').getByRole("button", { name: "Revert" }).click();
  await page.getByRole("button", { name: "Confirm" }).click();
  await page.getByRole("status").filter({ hasText: "Reverted to ui-one" }).waitFor();
  await until("after the revert ui-one is current (ferro snapshot-current)", async () => ferro("snapshot-current", domain) === "ui-one");
  await until("the reverted domain runs (ferro domstate)", async () => state() === "running");
  await until("the page marks ui-one current", async () => (await page.locator('tr[data-snapshot="ui-one"]').textContent()).includes("current"));
  await page.locator('tr[data-snapshot="ui-two"]').getByRole("button", { name: "Delete" }).click();
  await page.getByRole("button", { name: "Confirm" }).click();
  await page.locator('tr[data-snapshot="ui-two"]').waitFor({ state: "detached" });
  check(snapshots().map((s) => s.name).join() === "ui-one", "Delete (confirmed) removes the snapshot (ferro snapshot-list)");
  await page.screenshot({ path: `${shots}/snapshots.png`, fullPage: true });
  await until("the page shows the domain running", async () => (await page.locator("h1 .badge").textContent()) === "running");

  // Force off (confirmed in the page's dialog), then Start, each seen by `ferro domstate`.
  await page.getByRole("button", { name: "Force off" }).click();
  await page.getByRole("button", { name: "Confirm" }).click();
  await until("Force off shuts the domain off (ferro domstate)", async () => state() === "shut off");
  await page.getByRole("button", { name: "Start" }).waitFor({ state: "visible" });
  await until("the page shows the domain shut off", async () => (await page.locator("h1 .badge").textContent()) === "shut off");
  await page.getByRole("button", { name: "Start" }).click();
  await until("Start runs the domain again (ferro domstate)", async () => state() === "running");
  await until("the page shows the domain running", async () => (await page.locator("h1 .badge").textContent()) === "running");

  // A change made elsewhere (the CLI) shows up by itself; Resume then undoes it.
  ferro("suspend", domain);
  await until("the page shows a pause made with the CLI by itself", async () => (await page.locator("h1 .badge").textContent()) === "paused");
  await page.getByRole("button", { name: "Resume" }).click();
  await until("Resume runs the domain again (ferro domstate)", async () => state() === "running");

  // Storage: a volume made in the form, an uploaded file whose bytes land in the pool, a delete.
  await page.getByRole("link", { name: "Storage" }).click();
  const pool = page.locator(`article[data-pool="${env("FERRO_POOL")}"]`);
  await pool.getByLabel("Volume", { exact: true }).fill("from-form");
  await pool.getByLabel("Size", { exact: true }).fill("16M");
  await pool.getByRole("button", { name: "Create volume" }).click();
  await pool.locator('tr[data-volume="from-form"]').waitFor();
  check(ferro("vol-list", env("FERRO_POOL")).includes("from-form"), "a volume made in the form is listed by ferro vol-list");
  const upload = Buffer.alloc(3 << 20);
  for (let i = 0; i < upload.length; i += 4096) upload.writeUInt32LE(i ^ 0x5a5a5a5a, i);
  await pool.locator('input[type="file"]').setInputFiles({ name: "uploaded.img", mimeType: "application/octet-stream", buffer: upload });
  await pool.locator('tr[data-volume="uploaded.img"]').waitFor();
  await until("the uploaded bytes are the volume's bytes", async () => {
    const onDisk = readFileSync(`${env("FERRO_POOL_DIR")}/uploaded.img`);
    return onDisk.length === upload.length && createHash("sha256").update(onDisk).digest("hex") === createHash("sha256").update(upload).digest("hex");
  });
  await pool.locator('tr[data-volume="from-form"]').getByRole("button", { name: "Delete" }).click();
  await page.getByRole("button", { name: "Confirm" }).click();
  await pool.locator('tr[data-volume="from-form"]').waitFor({ state: "detached" });
  check(!existsSync(`${env("FERRO_POOL_DIR")}/from-form`), "Delete (confirmed) removes the volume's file");
  await page.getByRole("link", { name: "Jobs" }).click();
  const job = page.locator(`tr[data-job="${env("FERRO_JOB")}"]`);
  await job.getByText("completed").waitFor();
  check((await job.locator("progress").evaluate((p) => p.value)) === 1, "the jobs page shows the finished copy job with a full progress bar");
  await page.getByRole("link", { name: "Networks" }).click();
  await page.getByRole("heading", { name: "Networks" }).waitFor();
  // A network defined in the page's form (not started: that would make a bridge on this host).
  await page.getByLabel("Network name").fill("uinet");
  await page.getByLabel("Mode").selectOption("isolated");
  await page.getByLabel("Bridge", { exact: true }).fill("fvui0");
  await page.getByLabel("Gateway address").fill("10.93.0.1/24");
  await page.getByLabel("DHCP from").fill("10.93.0.10");
  await page.getByLabel("DHCP to").fill("10.93.0.20");
  await page.getByLabel("Start with the host").uncheck();
  await page.getByRole("button", { name: "Define network" }).click();
  await page.locator('article[data-network="uinet"]').waitFor();
  const uinet = ferro("net-dumpconfig", "uinet");
  check(/mode = "isolated"/.test(uinet) && /bridge = "fvui0"/.test(uinet) && /start = "10.93.0.10"/.test(uinet), "the network form defines what ferro net-dumpconfig shows");

  // The create form defines and starts a domain that `ferro list` shows.
  await page.getByRole("link", { name: "Create VM" }).click();
  await page.getByLabel("Name", { exact: true }).fill("made-in-browser");
  await page.getByLabel("Memory", { exact: true }).fill("64M");
  await page.getByLabel("Test guest", { exact: true }).fill("idle");
  await page.getByRole("button", { name: "Create" }).click();
  await page.getByRole("status").filter({ hasText: "Created made-in-browser" }).waitFor();
  await until("the created domain is listed by ferro list --all, running", async () =>
    ferro("list", "--all").split("\n").some((l) => l.includes("made-in-browser") && l.includes("running")),
  );
  // The create form puts the NIC on a network chosen by name.
  await page.getByRole("link", { name: "Create VM" }).click();
  await page.getByLabel("Name", { exact: true }).fill("on-uinet");
  await page.getByLabel("Memory", { exact: true }).fill("64M");
  await page.getByLabel("Test guest", { exact: true }).fill("idle");
  await page.locator('select[name="nic"]').selectOption("network:uinet");
  await page.getByLabel("Start it now").uncheck();
  await page.getByRole("button", { name: "Create" }).click();
  await page.getByRole("status").filter({ hasText: "Created on-uinet" }).waitFor();
  const onUinet = ferro("dumpconfig", "on-uinet");
  check(onUinet.includes("[[nic]]") && onUinet.includes('network = "uinet"'), "the create form's network choice is the definition's NIC (ferro dumpconfig)");
  await page.getByRole("link", { name: "Events" }).click();
  await page.locator("ol.events li", { hasText: "made-in-browser" }).first().waitFor();
  check(true, "the event feed shows the new domain's events");
  check(page.errors.length === 0, `no errors in the browser console as admin: ${page.errors.join("; ")}`);
  await context.close();

  // --- readonly, phone-sized ---
  const ro = await openPage({ width: 390, height: 844 });
  await ro.page.signIn(env("FERRO_READONLY_TOKEN"));
  await row(ro.page, domain).getByText("running").waitFor();
  await row(ro.page, domain).getByRole("link", { name: domain }).click();
  await ro.page.getByRole("heading", { name: domain }).waitFor();
  const toolbar = ro.page.getByRole("toolbar", { name: "Domain actions" });
  // all() does not wait: the toolbar may be drawn a moment after the heading.
  await until("the domain page's action buttons", async () => (await toolbar.getByRole("button").count()) >= 9);
  const buttons = await toolbar.getByRole("button").all();
  check(buttons.length >= 9, `the domain page has its ${buttons.length} action buttons`);
  for (const b of buttons) check(await b.isDisabled(), `readonly: "${await b.textContent()}" is disabled`);
  const roSnapshot = ro.page.locator('tr[data-snapshot="ui-one"]');
  await roSnapshot.waitFor();
  for (const b of await roSnapshot.getByRole("button").all()) check(await b.isDisabled(), `readonly: the snapshot's "${await b.textContent()}" is disabled`);
  const width = await ro.page.evaluate(() => document.documentElement.scrollWidth);
  check(width <= 390, `the domain page fits a phone's width (${width} px)`);
  await ro.page.screenshot({ path: `${shots}/domain-phone-readonly.png`, fullPage: true });
  await ro.page.getByRole("link", { name: "Create VM" }).click();
  check(await ro.page.getByRole("button", { name: "Create" }).isDisabled(), "readonly: the create form is disabled");
  await ro.page.getByRole("link", { name: "Storage" }).click();
  await ro.page.getByRole("heading", { name: "Storage pools" }).waitFor();
  const roPool = ro.page.locator(`article[data-pool="${env("FERRO_POOL")}"]`);
  await roPool.locator('tr[data-volume="uploaded.img"]').waitFor();
  check(await roPool.getByRole("button", { name: "Create volume" }).isDisabled(), "readonly: Create volume is disabled");
  check(await roPool.locator('input[type="file"]').isDisabled(), "readonly: the upload is disabled");
  for (const b of await roPool.getByRole("button", { name: "Delete" }).all()) check(await b.isDisabled(), "readonly: a volume's Delete is disabled");
  await ro.page.getByRole("link", { name: "Networks" }).click();
  await ro.page.locator('article[data-network="uinet"]').waitFor();
  check(await ro.page.getByRole("button", { name: "Define network" }).isDisabled(), "readonly: Define network is disabled");
  check(state() === "running", "nothing the readonly session did changed the domain");
  check(ro.page.errors.length === 0, `no errors in the browser console as readonly: ${ro.page.errors.join("; ")}`);
  await ro.context.close();
  console.log("all browser checks passed");
} finally {
  await browser.close();
}
