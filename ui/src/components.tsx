// Small pieces every page uses: sizes and rates in words, the graph, the confirm dialog, state
// badges and progress bars.

import type { ComponentChildren } from "preact";
import { useEffect, useRef } from "preact/hooks";
import type { Job } from "./api";

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
}

export const rate = (n: number) => `${bytes(n)}/s`;
export const percent = (n: number) => `${n.toFixed(1)} %`;

export function since(ms: number | null): string {
  if (!ms) return "–";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${Math.round(s / 3600)} h`;
}

export function StateBadge({ state }: { state: string }) {
  return <span class={`badge state-${state}`}>{state === "shutoff" ? "shut off" : state}</span>;
}

/** A line graph as SVG: one circle per sample carries its time and value as data attributes. */
export function Graph(props: { metric: string; title: string; points: { time_ms: number; value: number }[]; format: (v: number) => string; max?: number }) {
  const width = 320;
  const height = 110;
  const pad = 4;
  const { points } = props;
  const top = Math.max(props.max ?? 0, ...points.map((p) => p.value), 1e-9);
  const first = points[0]?.time_ms ?? 0;
  const span = Math.max((points.at(-1)?.time_ms ?? 0) - first, 1);
  const x = (t: number) => pad + ((t - first) / span) * (width - 2 * pad);
  const y = (v: number) => height - pad - (v / top) * (height - 2 * pad);
  const line = points.map((p) => `${x(p.time_ms).toFixed(1)},${y(p.value).toFixed(1)}`).join(" ");
  const last = points.at(-1);
  return (
    <figure class="graph-box">
      <figcaption>
        {props.title} <strong>{last ? props.format(last.value) : "–"}</strong>
      </figcaption>
      <svg class="graph" data-metric={props.metric} viewBox={`0 0 ${width} ${height}`} role="img" aria-label={`${props.title} over the last minutes`}>
        <line class="axis" x1={pad} y1={height - pad} x2={width - pad} y2={height - pad} />
        {points.length > 1 && <polyline points={line} />}
        {points.map((p) => (
          <circle cx={x(p.time_ms)} cy={y(p.value)} r={1.6} data-time={p.time_ms} data-value={p.value}>
            <title>{props.format(p.value)}</title>
          </circle>
        ))}
      </svg>
      <div class="graph-scale">max {props.format(top)}</div>
    </figure>
  );
}

/** An in-page confirmation: a native modal <dialog> with `Confirm` and `Cancel`. */
export function ConfirmDialog(props: { text: string; onConfirm: () => void; onCancel: () => void }) {
  const ref = useRef<HTMLDialogElement>(null);
  useEffect(() => {
    ref.current?.showModal();
  }, []);
  return (
    <dialog ref={ref} class="confirm" onCancel={props.onCancel}>
      <p>{props.text}</p>
      <div class="buttons">
        <button class="danger" onClick={props.onConfirm}>
          Confirm
        </button>
        <button onClick={props.onCancel}>Cancel</button>
      </div>
    </dialog>
  );
}

export function Progress({ done, total, label }: { done: number; total: number; label: string }) {
  const fraction = total > 0 ? Math.min(1, done / total) : 0;
  return (
    <div class="progress">
      <progress max={1} value={fraction} aria-label={label} />
      <span>{(fraction * 100).toFixed(0)} %</span>
    </div>
  );
}

export function jobProgress(job: Job): [number, number] {
  return job.total_bytes !== undefined ? [job.done_bytes ?? 0, job.total_bytes] : [job.done_steps ?? 0, job.total_steps ?? 0];
}

export function ErrorLine({ error }: { error: string | null }) {
  return error ? (
    <p class="error" role="alert">
      {error}
    </p>
  ) : null;
}

export function Section(props: { title: string; children: ComponentChildren; id?: string }) {
  return (
    <section id={props.id}>
      <h2>{props.title}</h2>
      {props.children}
    </section>
  );
}
