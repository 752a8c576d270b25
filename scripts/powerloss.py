#!/usr/bin/env python3
"""Power-cut test of Loam's records: both sides of scripts/vm-powerloss-test.sh.

`host` boots the VM again and again on one data disk, cuts it (SIGKILL of
qemu) at a seeded random moment while the workload runs, and checks what the
next boot finds against what the driver had acknowledged. `guest` runs inside
the VM: it checks that every record file on the disk parses, starts the real
`loam serve` there and hands over to the client (bench/src/bin/powerloss.rs),
which retries the calls whose outcome the cut left unknown, lists what the
driver has, and drives concurrent CreateVolume, CreateSnapshot,
DeleteSnapshot and DeleteVolume calls until the cut (or, on the last boot,
deletes everything).

Both report over a serial port (ttyS1, a file on the host) whose output
survives the cut. Before each call the client writes what it is about to do
and waits until the port has sent it (tcdrain), so the host knows every call
that may have reached the driver; only after the call returned OK does it
write the acknowledgement. A line the cut swallowed is at worst an outcome the
host treats as unknown and has retried; a call the host never heard of cannot
have happened.
"""

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import termios
import time
import tty

PREFIX = "PL "
SOCKET = "/run/powerloss/csi.sock"
DRIVER_LOG = "/run/powerloss/driver.log"


# --------------------------------------------------------------------- guest


class Channel:
    """The serial port to the host, raw (no line discipline)."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
        tty.setraw(self.fd)
        attrs = termios.tcgetattr(self.fd)
        attrs[4] = attrs[5] = termios.B115200
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)

    def send(self, kind, **fields):
        line = (PREFIX + json.dumps({"kind": kind, **fields}, separators=(",", ":")) + "\n").encode()
        view = memoryview(line)
        while view:
            view = view[os.write(self.fd, view) :]
        termios.tcdrain(self.fd)


def records(root):
    """Record files that do not parse, and leftover temporary files, before start-up."""
    torn, leftover, count = [], 0, 0
    for table in ("volumes", "snapshots", "groups"):
        directory = os.path.join(root, "meta", table)
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            path = os.path.join(directory, name)
            if name.endswith(".json.tmp"):
                leftover += 1
            elif name.endswith(".json"):
                count += 1
                try:
                    with open(path, "rb") as f:
                        json.loads(f.read())
                except ValueError as e:
                    torn.append(f"{path}: {e}")
    return count, torn, leftover


def start_driver(loam, root, log):
    """`loam serve` on `root`, once its socket accepts; None if it does not start."""
    driver = subprocess.Popen(
        [loam, "serve", "--endpoint", "unix://" + SOCKET, "--node-id", "powerloss", "--root", root, "--quota", "off"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(SOCKET)
            return driver
        except OSError:
            time.sleep(0.2)
        finally:
            probe.close()
    driver.kill()
    return None


def guest(args):
    channel = Channel(args.channel)
    count, torn, leftover = records(args.root)
    channel.send("records", count=count, torn=torn, leftover=leftover)
    with open(DRIVER_LOG, "w") as log:
        driver = start_driver(args.loam, args.root, log)
    with open(DRIVER_LOG) as f:
        text = f.read()
    if driver is None:
        channel.send("start-failed", log=text[-4000:])
        return
    channel.send("started", damaged=[line for line in text.splitlines() if "damaged" in line])
    # The client reports on the same port; it returns only on the last boot
    # (or when a call failed: the host sees that from its messages).
    subprocess.run([args.client, "--socket", SOCKET, "--channel", args.channel, "--plan", args.plan])
    driver.terminate()
    driver.wait()
    left = [
        os.path.join(d, n)
        for d in ("volumes", "snapshots", "meta/volumes", "meta/snapshots", "meta/groups")
        for n in os.listdir(os.path.join(args.root, d))
    ]
    channel.send("stopped", left=left)


# ---------------------------------------------------------------------- host


def key(op):
    return json.dumps(op, sort_keys=True)


class Model:
    """What must exist after the next boot: the objects whose creation was
    acknowledged and whose deletion was not, plus the outcome of every retry
    of an operation the cut left unknown."""

    def __init__(self):
        self.volumes = {}  # id -> name
        self.snapshots = {}
        self.unknown = []  # operations begun and never answered
        self.acked = 0  # acknowledged operations checked by a later boot
        self.retried = 0
        self.failures = []

    def fail(self, boot, what):
        self.failures.append(f"boot {boot}: {what}")

    def apply(self, op, new_id):
        kind = op["op"]
        if kind == "create-volume":
            self.volumes[new_id] = op["name"]
        elif kind == "create-snapshot":
            self.snapshots[new_id] = op["name"]
        elif kind == "delete-volume":
            self.volumes.pop(op["id"], None)
        elif kind == "delete-snapshot":
            self.snapshots.pop(op["id"], None)

    def check_start(self, boot, messages):
        """Checks a boot's start-up against the model; False when the driver did not start."""
        records = first(messages, "records")
        if records is None:
            self.fail(boot, "the guest never reported the records it found (see its console)")
            return False
        for torn in records["torn"]:
            self.fail(boot, f"torn record: {torn}")
        failed, started = first(messages, "start-failed"), first(messages, "started")
        if failed is not None or started is None:
            log = failed["log"] if failed else "(no log)"
            self.fail(boot, f"the driver did not start after the cut:\n{log}")
            return False
        for line in started["damaged"]:
            self.fail(boot, f"a record was set aside as damaged: {line}")
        for retried in (m for m in messages if m["kind"] == "retried"):
            if "error" in retried:
                self.fail(boot, f"retry of {key(retried['op'])} did not converge: {retried['error']}")
            else:
                self.retried += 1
                self.apply(retried["op"], retried["id"])
        self.unknown = []
        state = first(messages, "state")
        if state is None:
            self.fail(boot, "the guest never reported the volumes and snapshots it found")
            return False
        for kind, expected, found in (
            ("volume", self.volumes, state["volumes"]),
            ("snapshot", self.snapshots, state["snapshots"]),
        ):
            for lost in sorted(set(expected) - set(found)):
                self.fail(boot, f"acknowledged {kind} {expected[lost]} ({lost}) is gone")
            for extra in sorted(set(found) - set(expected)):
                self.fail(boot, f"{kind} {extra} exists, but its deletion was acknowledged or it was never created")
        return True

    def take_workload(self, boot, messages):
        """Folds the operations of a cut boot into the model."""
        if first(messages, "workload") is None:
            self.fail(boot, "the workload never started")
        if first(messages, "workload-ended") is not None:
            self.fail(boot, "every worker stopped before the cut")
        answered = {}
        for m in messages:
            if m["kind"] in ("ack", "error"):
                answered[key(m["op"])] = m
        self.unknown = []
        for m in (m for m in messages if m["kind"] == "begin"):
            answer = answered.get(key(m["op"]))
            if answer is None:
                self.unknown.append(m["op"])
            elif answer["kind"] == "error":
                self.fail(boot, f"{key(m['op'])} failed: {answer['error']}")
                self.unknown.append(m["op"])
            else:
                self.acked += 1
                self.apply(m["op"], answer["id"])

    def check_emptied(self, boot, messages):
        emptied, stopped = first(messages, "emptied"), first(messages, "stopped")
        if emptied is None or stopped is None:
            self.fail(boot, "the last boot did not delete everything (see its console)")
        elif emptied["volumes"] or emptied["snapshots"] or stopped["left"]:
            self.fail(boot, f"left after deleting everything: {emptied} {stopped}")


def first(messages, kind):
    return next((m for m in messages if m["kind"] == kind), None)


def read_channel(path):
    """The whole lines the guest sent; the cut may have swallowed the last one's end."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    messages = []
    for line in data.split(b"\n")[:-1]:
        line = line.strip(b"\r").decode(errors="replace")
        if line.startswith(PREFIX):
            messages.append(json.loads(line[len(PREFIX) :]))
    return messages


def boot_vm(args, boot, cut, plan, rng):
    """Boots once; cuts the power a random while after the workload started.
    The messages of the boot and the seconds from workload to cut."""
    with open(os.path.join(args.work, "plan.json"), "w") as f:
        json.dump(plan, f)
    channel = os.path.join(args.work, f"channel-{boot}.log")
    console = open(os.path.join(args.work, f"console-{boot}.log"), "wb")
    qemu = subprocess.Popen(
        args.qemu + ["-display", "none", "-monitor", "none", "-serial", "stdio", "-serial", f"file:{channel}"],
        stdin=subprocess.DEVNULL,
        stdout=console,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + args.timeout
    after = None
    try:
        while qemu.poll() is None and time.monotonic() < deadline:
            if cut and first(read_channel(channel), "workload") is not None:
                after = rng.uniform(args.min_delay, args.max_delay)
                time.sleep(after)
                break
            time.sleep(0.05)
    finally:
        if qemu.poll() is None:
            qemu.kill()  # SIGKILL: the power cut
        qemu.wait()
        console.close()
    return read_channel(channel), after


def host(args):
    rng = random.Random(args.seed)
    model = Model()
    started = time.monotonic()
    for boot in range(1, args.cuts + 2):
        cut = boot <= args.cuts
        plan = {"boot": boot, "workload": cut, "retry": model.unknown, "workers": args.workers}
        messages, after = boot_vm(args, boot, cut, plan, rng)
        before = len(model.failures)
        began = sum(m["kind"] == "begin" for m in messages)
        if model.check_start(boot, messages):
            if cut:
                model.take_workload(boot, messages)
            else:
                model.check_emptied(boot, messages)
        records = first(messages, "records") or {"count": 0, "leftover": 0}
        found = f"{records['count']} records and {records['leftover']} unfinished writes found"
        what = f"cut {after:.2f} s into the workload, {began} calls begun" if after is not None else "no cut"
        print(f"boot {boot}: {found}; {what}; {len(model.unknown)} left unanswered", flush=True)
        if len(model.failures) > before:
            tail = open(os.path.join(args.work, f"console-{boot}.log"), "rb").read()[-3000:]
            print(f"--- console of boot {boot} (end) ---\n{tail.decode(errors='replace')}", flush=True)
            if first(messages, "state") is None:
                break  # nothing further can be checked against this disk
    for failure in model.failures:
        print(f"FAIL {failure}", file=sys.stderr)
    outcome = "ok" if not model.failures else f"{len(model.failures)} failures"
    print(
        f"powerloss: {args.cuts} cuts (seed {args.seed}), {model.acked} acknowledged operations checked, "
        f"{model.retried} unknown outcomes retried, {len(model.volumes)} volumes and "
        f"{len(model.snapshots)} snapshots listed before the last boot deleted them, {time.monotonic() - started:.0f} s: {outcome}"
    )
    return 0 if not model.failures else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="side", required=True)
    g = sub.add_parser("guest", help="inside the VM: check the records, start the driver, run the client")
    g.add_argument("--plan", required=True, help="the host's plan for this boot (JSON)")
    g.add_argument("--channel", required=True, help="serial port to the host")
    g.add_argument("--loam", required=True, help="the loam binary")
    g.add_argument("--client", required=True, help="the powerloss client binary (bench/src/bin/powerloss.rs)")
    g.add_argument("--root", required=True, help="Loam's root, on the data disk")
    h = sub.add_parser("host", help="boot, cut and check; the qemu command follows --")
    h.add_argument("--work", required=True, help="directory for the plan, consoles and channels")
    h.add_argument("--cuts", type=int, default=3)
    h.add_argument("--seed", type=int, default=1)
    h.add_argument("--workers", type=int, default=6, help="concurrent clients in the guest")
    h.add_argument("--min-delay", type=float, default=0.5, help="earliest cut, seconds into the workload")
    h.add_argument("--max-delay", type=float, default=8.0, help="latest cut, seconds into the workload")
    h.add_argument("--timeout", type=float, default=300, help="seconds one boot may take")
    h.add_argument("qemu", nargs=argparse.REMAINDER, help="-- qemu-system-x86_64 ARGS...")
    args = parser.parse_args()
    if args.side == "guest":
        guest(args)
        return 0
    if args.qemu[:1] == ["--"]:
        args.qemu = args.qemu[1:]
    return host(args)


if __name__ == "__main__":
    sys.exit(main())
