// What changes by itself: the event feed (GET /v1/events?follow=true, JSON lines), the domain list
// and host figures (refetched on every event and every few seconds), and the stats history of each
// active domain (sampled every SAMPLE_MS) behind the graphs. Pages subscribe with useLive().

import { useEffect, useState } from "preact/hooks";
import { type Domain, type DomainStats, type FerroEvent, type Host, domainPath, get } from "./api";

export const SAMPLE_MS = 2000;
/** Samples kept per domain: five minutes. */
const HISTORY = 150;
const EVENTS_KEPT = 200;

/** One point of a domain's graphs; rates are per second since the previous sample. */
export interface Sample {
  time_ms: number;
  cpu_percent: number;
  rss_bytes: number;
  disk_bytes_per_s: number;
  net_bytes_per_s: number;
}

export interface LiveState {
  domains: Domain[] | null;
  host: Host | null;
  events: FerroEvent[];
  stats: Map<string, DomainStats>;
  history: Map<string, Sample[]>;
  error: string | null;
  /** Bumped on every event, so pages showing other lists know to refetch. */
  eventCount: number;
}

const state: LiveState = { domains: null, host: null, events: [], stats: new Map(), history: new Map(), error: null, eventCount: 0 };
const listeners = new Set<() => void>();
let running: { stop: () => void } | null = null;

function changed(): void {
  listeners.forEach((l) => l());
}

/** The live state; the calling component renders again whenever it changes. */
export function useLive(): LiveState {
  const [, setTick] = useState(0);
  useEffect(() => {
    const listener = () => setTick((t) => t + 1);
    listeners.add(listener);
    return () => {
      listeners.delete(listener);
    };
  }, []);
  return state;
}

/** Refetches the domain list and host figures now (after an action, or an event). */
export async function refresh(): Promise<void> {
  try {
    const [domains, host] = await Promise.all([get<Domain[]>("/v1/domains"), get<Host>("/v1/host")]);
    state.domains = domains;
    state.host = host;
    state.error = null;
  } catch (e) {
    state.error = (e as Error).message;
  }
  changed();
}

/** Domains seen active by the previous sample. */
let seenActive = new Set<string>();

async function sample(): Promise<void> {
  const active = (state.domains ?? []).filter((d) => d.state === "running" || d.state === "paused");
  for (const name of state.stats.keys()) {
    if (!active.some((d) => d.name === name)) state.stats.delete(name);
  }
  // A domain just started may not answer stats yet (ferrod says 502 until its VMM does), and the
  // browser logs every failed request: its first sample waits for the next round.
  const ready = active.filter((d) => seenActive.has(d.name));
  seenActive = new Set(active.map((d) => d.name));
  await Promise.all(
    ready.map(async (d) => {
      try {
        const now = await get<DomainStats>(domainPath(d.name, "stats"));
        record(d.name, now, Date.now());
      } catch {
        // stopped between the list and the stats: the next refresh shows it
      }
    }),
  );
  changed();
}

function record(name: string, now: DomainStats, time_ms: number): void {
  const before = state.stats.get(name);
  const beforeTime = state.history.get(name)?.at(-1)?.time_ms;
  state.stats.set(name, now);
  if (!before || beforeTime === undefined) {
    state.history.set(name, state.history.get(name) ?? []);
    state.history.get(name)!.push({ time_ms, cpu_percent: 0, rss_bytes: now.rss_bytes, disk_bytes_per_s: 0, net_bytes_per_s: 0 });
    return;
  }
  const seconds = Math.max((time_ms - beforeTime) / 1000, 0.001);
  const sum = (s: DomainStats, f: (s: DomainStats) => number[]) => f(s).reduce((a, b) => a + b, 0);
  const disk = (s: DomainStats) => s.disks.map((d) => d.read_bytes + d.write_bytes);
  const net = (s: DomainStats) => s.nics.map((n) => n.rx_bytes + n.tx_bytes);
  // A restarted VMM starts its counters at zero again: rates are never negative.
  const rate = (a: number, b: number) => Math.max(0, (a - b) / seconds);
  const cpuSeconds = Math.max(0, now.cpu_time_ns - before.cpu_time_ns) / 1e9;
  const points = state.history.get(name)!;
  points.push({
    time_ms,
    cpu_percent: Math.min(100, (100 * cpuSeconds) / seconds / Math.max(1, now.vcpus)),
    rss_bytes: now.rss_bytes,
    disk_bytes_per_s: rate(sum(now, disk), sum(before, disk)),
    net_bytes_per_s: rate(sum(now, net), sum(before, net)),
  });
  if (points.length > HISTORY) points.splice(0, points.length - HISTORY);
}

/** Follows ferrod's event stream until stopped; reconnects after a pause when it breaks. */
async function follow(signal: AbortSignal): Promise<void> {
  let since = 0;
  while (!signal.aborted) {
    try {
      const response = await fetch(`/v1/events?follow=true&since=${since}`, { signal, credentials: "same-origin" });
      if (!response.ok || !response.body) throw new Error(`events: HTTP ${response.status}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let pending = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        pending += value;
        const lines = pending.split("\n");
        pending = lines.pop() ?? "";
        for (const line of lines.filter((l) => l.trim())) {
          const event = JSON.parse(line) as FerroEvent;
          since = Math.max(since, event.seq);
          state.events.unshift(event);
          state.events.length = Math.min(state.events.length, EVENTS_KEPT);
          state.eventCount++;
        }
        if (lines.length > 1) void refresh();
      }
    } catch {
      if (signal.aborted) return;
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

/** Starts following and sampling (once per sign-in). */
export function startLive(): void {
  if (running) return;
  const abort = new AbortController();
  void refresh().then(sample);
  void follow(abort.signal);
  const timer = setInterval(() => void refresh().then(sample), SAMPLE_MS);
  running = {
    stop: () => {
      abort.abort();
      clearInterval(timer);
    },
  };
}

export function stopLive(): void {
  running?.stop();
  running = null;
  Object.assign(state, { domains: null, host: null, events: [], stats: new Map(), history: new Map(), error: null, eventCount: 0 });
}
