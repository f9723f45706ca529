// The serial console in the page: xterm.js (DOM renderer, so the text is in the page for tests
// and screen readers) joined to GET /v1/domains/NAME/console as a WebSocket, bytes both ways.

import { Terminal } from "@xterm/xterm";
import "@xterm/xterm/css/xterm.css";
import { useEffect, useRef, useState } from "preact/hooks";
import { domainPath } from "./api";

export function Console({ name, onClose }: { name: string; onClose: () => void }) {
  const box = useRef<HTMLDivElement>(null);
  const [status, setStatus] = useState("connecting…");
  useEffect(() => {
    const term = new Terminal({ convertEol: true, cursorBlink: true, fontSize: 14, rows: 24, cols: 80, scrollback: 2000 });
    term.open(box.current!);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}${domainPath(name, "console")}`);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      setStatus("connected");
      term.focus();
    };
    socket.onmessage = (e) => term.write(new Uint8Array(e.data as ArrayBuffer));
    socket.onclose = (e) => setStatus(e.reason ? `closed: ${e.reason}` : "closed");
    const encoder = new TextEncoder();
    const typed = term.onData((data) => {
      if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
    });
    return () => {
      typed.dispose();
      socket.close();
      term.dispose();
    };
  }, [name]);
  return (
    <section class="console" id="console">
      <h2>
        Console <small data-testid="console-status">{status}</small>
        <button onClick={onClose}>Close console</button>
      </h2>
      <div class="terminal" ref={box} data-testid="terminal" />
    </section>
  );
}
