#!/usr/bin/env python3
"""Soak: N domains writing and flushing their disks under ferrod while ferrod, VMMs and jobs are
killed at random; then every disk must pass `qemu-img check`, every write a guest saw
acknowledged as flushed must be on its disk, and nothing may be left behind.

Not part of the test suite (it runs for as long as you ask). Usage, as root on a KVM host, after
`cargo build --release -p ferro-cli -p ferro-manager`:

    scripts/soak.py --minutes 30 [--domains 8] [--bin target/release]

What runs:
- ferrod in a network namespace the script creates (its default NAT network lives there, never
  on the host's own interfaces), with a private FERRO_HOME under /var/tmp.
- N domains of the built-in `soak` test guest (guests/src/soak.c), each with a qcow2 volume from
  a directory pool and a NIC on the default network. The guest keeps a ring of 256 sequence-numbered
  records on its disk, flushes after each and prints "soak: flushed K" (every 16th K) once the
  flush completed; after a restart it continues from the highest record on its disk. While it
  runs, the script pings each guest's tap from the namespace's bridge side and sends broadcast
  frames, so the VMMs' NICs carry traffic too (the guest itself does not answer).
- A watcher per domain reads its console through ferrod and records the acknowledged K's.
- Chaos, every 1-5 s: SIGKILL ferrod (restarted at once), SIGKILL a VMM (its domain is started
  again), destroy/start a domain, clone a spare volume (a job) and half the time SIGKILL ferrod
  while the clone runs. After each step every shut-off domain is started again.

The checks at the end (after destroying every domain and stopping ferrod with SIGTERM):
- `qemu-img check` exits 0 on every volume (no corruption, no leaks);
- for every acknowledged K, the disk's record in K's slot holds K or a later K of that slot;
- no process names the home any more, no tap is left in the namespace, no socket in the run
  directory, no `vm-*` cgroup, and no scratch file of a killed job in the pool.
The home is removed when every check passed and kept for a look otherwise.
Exit status 0 when every check passed; the summary names each failure.
"""

import argparse
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

RING = 256
MAGIC = 0x4345524B414F5346  # "FSOAKREC"
MULT = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Soak:
    def __init__(self, args):
        self.args = args
        self.bin = os.path.abspath(args.bin)
        self.home = tempfile.mkdtemp(prefix="ferro-soak-", dir="/var/tmp")
        self.ns = f"ferro-soak-{os.getpid()}"
        self.env = dict(os.environ, FERRO_HOME=self.home, FERRO_BIN=os.path.join(self.bin, "ferro"), RUST_LOG="warn")
        self.ferrod = None
        self.acked = {}  # domain -> set of acknowledged K
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.counts = {"ferrod killed": 0, "VMM killed": 0, "domain restarted": 0, "clone jobs": 0, "ferrod killed during a job": 0}
        self.failures = []

    # -- ferrod and the CLI ------------------------------------------------------------------
    def start_ferrod(self):
        sock = os.path.join(self.home, "ferrod.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        err = open(os.path.join(self.home, "ferrod.stderr"), "a")
        self.ferrod = subprocess.Popen(["ip", "netns", "exec", self.ns, os.path.join(self.bin, "ferrod")],
                                       env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock)
                s.close()
                return
            except OSError:
                if self.ferrod.poll() is not None:
                    raise SystemExit(f"ferrod exited ({self.ferrod.returncode}); see {self.home}/ferrod.stderr")
                time.sleep(0.05)
        raise SystemExit("ferrod did not open its socket within 30 s")

    def kill_ferrod(self):
        self.ferrod.kill()
        self.ferrod.wait()

    def ferro(self, *args, check=True):
        out = subprocess.run([os.path.join(self.bin, "ferro"), *args], env=self.env, capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise RuntimeError(f"ferro {' '.join(args)}: {out.stderr.strip()}")
        return out

    def domain(self, name):
        """GET /v1/domains/NAME over ferrod's socket: the domain's state and VMM pid, or None."""
        try:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(os.path.join(self.home, "ferrod.sock"))
            s.sendall(f"GET /v1/domains/{name} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            s.close()
            head, _, body = reply.partition(b"\r\n\r\n")
            return json.loads(body) if head.startswith(b"HTTP/1.1 200") else None
        except (OSError, ValueError):
            return None

    # -- set-up --------------------------------------------------------------------------------
    def setup(self):
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        subprocess.run(["ip", "-n", self.ns, "link", "set", "lo", "up"], check=True)
        self.start_ferrod()
        pool = os.path.join(self.home, "images")
        self.ferro("pool-define-as", "soak", "dir", "--target", pool)
        self.ferro("pool-build", "soak")
        self.ferro("pool-start", "soak")
        self.ferro("vol-create-as", "soak", "spare.qcow2", "64M", "--format", "qcow2")
        for i in range(self.args.domains):
            name = f"soak{i}"
            self.ferro("vol-create-as", "soak", f"{name}.qcow2", "16M", "--format", "qcow2")
            toml = os.path.join(self.home, f"{name}.toml")
            with open(toml, "w") as f:
                f.write(f'name = "{name}"\nmemory = "32M"\n[boot]\nguest = "soak"\n'
                        f'[[disk]]\npool = "soak"\nvolume = "{name}.qcow2"\nformat = "qcow2"\n'
                        f'[[nic]]\nnetwork = "default"\n')
            self.ferro("define", toml)
            self.ferro("start", name)
            self.acked[name] = set()
            threading.Thread(target=self.watch, args=(name,), daemon=True).start()
        threading.Thread(target=self.traffic, daemon=True).start()

    # -- watchers --------------------------------------------------------------------------------
    def watch(self, name):
        """Reads the domain's console through ferrod, reconnecting whenever it drops."""
        pattern = re.compile(rb"soak: flushed (\d+)")
        while not self.stop.is_set():
            try:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(5)
                s.connect(os.path.join(self.home, "ferrod.sock"))
                s.sendall(f"GET /v1/domains/{name}/console HTTP/1.1\r\nHost: soak\r\nConnection: Upgrade\r\nUpgrade: ferro-console\r\n\r\n".encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(1)
                    if not chunk:
                        raise OSError("closed during the upgrade")
                    head += chunk
                if not head.startswith(b"HTTP/1.1 101"):
                    raise OSError(head.split(b"\r\n")[0].decode(errors="replace"))
                buf = b""
                while not self.stop.is_set():
                    try:
                        chunk = s.recv(4096)
                    except socket.timeout:
                        continue
                    if not chunk:
                        break
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        m = pattern.search(line)
                        if m:
                            with self.lock:
                                self.acked[name].add(int(m.group(1)))
            except OSError:
                pass
            finally:
                s.close()
            time.sleep(0.2)

    def traffic(self):
        """Frames into every guest NIC: pings to the DHCP range from the bridge, and broadcasts."""
        while not self.stop.is_set():
            subprocess.run(["ip", "netns", "exec", self.ns, "ping", "-b", "-c", "20", "-i", "0.05", "-W", "1", "192.168.122.255"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)

    # -- chaos -------------------------------------------------------------------------------------
    def ensure_running(self):
        for name in self.acked:
            info = self.domain(name)
            if info and info.get("state") in ("shutoff", "crashed"):
                if self.ferro("start", name, check=False).returncode == 0:
                    self.counts["domain restarted"] += 1

    def chaos_step(self):
        action = random.choice(["kill-ferrod", "kill-vmm", "kill-vmm", "destroy-start", "clone-job"])
        names = list(self.acked)
        if action == "kill-ferrod":
            self.kill_ferrod()
            self.counts["ferrod killed"] += 1
            self.start_ferrod()
        elif action == "kill-vmm":
            info = self.domain(random.choice(names))
            if info and info.get("pid"):
                try:
                    os.kill(int(info["pid"]), signal.SIGKILL)
                    self.counts["VMM killed"] += 1
                except ProcessLookupError:
                    pass
                time.sleep(1)
        elif action == "destroy-start":
            name = random.choice(names)
            self.ferro("destroy", name, check=False)
        elif action == "clone-job":
            self.ferro("vol-delete", "--pool", "soak", "clone.qcow2", check=False)
            clone = subprocess.Popen([os.path.join(self.bin, "ferro"), "vol-clone", "--pool", "soak", "spare.qcow2", "clone.qcow2"],
                                     env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.counts["clone jobs"] += 1
            if random.random() < 0.5:
                time.sleep(random.uniform(0, 0.3))
                self.kill_ferrod()
                self.counts["ferrod killed during a job"] += 1
                self.start_ferrod()
            clone.wait(timeout=120)
        self.ensure_running()

    # -- checks --------------------------------------------------------------------------------------
    def records(self, path):
        raw = path + ".raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw], check=True)
        slots = {}
        with open(raw, "rb") as f:
            for slot in range(RING):
                f.seek((1 + slot) * 512)
                magic, k, check = struct.unpack("<QQQ", f.read(24))
                if magic == MAGIC and check == (k * MULT) & MASK and k % RING == slot:
                    slots[slot] = k
        os.unlink(raw)
        return slots

    def check(self):
        pool = os.path.join(self.home, "images")
        for name, acked in self.acked.items():
            path = os.path.join(pool, f"{name}.qcow2")
            qc = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
            if qc.returncode != 0:
                self.failures.append(f"{name}: qemu-img check exit {qc.returncode}: {qc.stdout.strip()} {qc.stderr.strip()}")
            slots = self.records(path)
            lost = sorted(k for k in acked if slots.get(k % RING, -1) < k)
            if lost:
                self.failures.append(f"{name}: {len(lost)} acknowledged writes missing, first {lost[:5]}")
            log(f"{name}: {len(acked)} acknowledged flushes seen (highest {max(acked, default=None)}), "
                f"disk holds up to {max(slots.values(), default=None)}, qemu-img check exit {qc.returncode}")
            if not acked:
                self.failures.append(f"{name}: never acknowledged a write")
        time.sleep(1)
        left = []
        for p in os.listdir("/proc"):
            try:
                if p.isdigit() and self.home.encode() in open(f"/proc/{p}/cmdline", "rb").read():
                    left.append(p)
            except OSError:
                pass
        if left:
            self.failures.append(f"processes still name the home: {left}")
        taps = subprocess.run(["ip", "-n", self.ns, "-o", "link", "show", "type", "tun"], capture_output=True, text=True).stdout.strip()
        if taps:
            self.failures.append(f"taps left: {taps}")
        run = os.path.join(self.home, "run")
        socks = [os.path.join(d, f) for d, _, fs in os.walk(run) for f in fs if f.endswith(".sock")] if os.path.isdir(run) else []
        if socks:
            self.failures.append(f"sockets left: {socks}")
        stale = [d for d, dirs, _ in os.walk("/sys/fs/cgroup") if os.path.basename(d).startswith("vm-soak")]
        if stale:
            self.failures.append(f"cgroups left: {stale}")
        scratch = [f for f in os.listdir(pool) if f.startswith(".")]
        if scratch:
            self.failures.append(f"scratch files of killed jobs left in the pool: {scratch}")

    def run(self):
        self.setup()
        log(f"{self.args.domains} domains running in {self.home}; chaos for {self.args.minutes} min")
        end = time.time() + self.args.minutes * 60
        last = 0
        while time.time() < end:
            time.sleep(random.uniform(1, 5))
            try:
                self.chaos_step()
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                log(f"chaos step: {e}")
                if self.ferrod.poll() is not None:
                    self.failures.append(f"ferrod died on its own ({self.ferrod.returncode})")
                    self.start_ferrod()
            if time.time() - last > 60:
                last = time.time()
                with self.lock:
                    total = sum(len(a) for a in self.acked.values())
                log(f"{self.counts}; acknowledged flushes seen: {total}")
        # Wind down: give the watchers a moment, destroy everything, stop ferrod cleanly.
        time.sleep(3)
        self.stop.set()
        for name in self.acked:
            self.ferro("destroy", name, check=False)
        self.ferro("net-destroy", "default", check=False)
        self.ferrod.send_signal(signal.SIGTERM)
        self.ferrod.wait(timeout=30)
        self.check()
        log(f"counts: {self.counts}")
        for f in self.failures:
            log(f"FAILED: {f}")
        log("soak: PASSED" if not self.failures else f"soak: {len(self.failures)} failures")
        subprocess.run(["ip", "netns", "del", self.ns])
        if not self.failures:
            subprocess.run(["rm", "-rf", self.home])
        return 0 if not self.failures else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--domains", type=int, default=8)
    p.add_argument("--bin", default=os.path.join(os.path.dirname(__file__), "..", "target", "release"))
    args = p.parse_args()
    sys.exit(Soak(args).run())


if __name__ == "__main__":
    main()
