#!/usr/bin/env python3
"""Writes eval/RESULTS.md from the CSV files eval/run collected (standard library only).

Plots (SVG) are drawn by `usnetd-bench eval-plot` into a `plots/` folder next to the output.
"""
import argparse
import csv
import json
import os
import platform
import subprocess


def rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def num(v, fmt="{:,.0f}"):
    try:
        return fmt.format(float(v))
    except (TypeError, ValueError):
        return v


def machine():
    model, cores = "unknown", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Hypervisor vendor:"):
                model += " (" + line.split(":", 1)[1].strip() + " guest)"
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return model, cores, platform.release(), mem


def plot(bench, data, outdir, name, points, title, xlabel, ylabel):
    """points: list of (x, series, value). Returns the markdown image line or ''."""
    points = [(x, s, v) for x, s, v in points if v not in (None, "")]
    if not points:
        return ""
    src = os.path.join(data, name + ".plot.csv")
    with open(src, "w") as f:
        f.write("x,series,value\n")
        for x, s, v in points:
            f.write(f"{x},{s},{v}\n")
    svg = os.path.join(outdir, "plots", name + ".svg")
    r = subprocess.run([bench, "eval-plot", "--csv", src, "--out", svg, "--title", title,
                        "--xlabel", xlabel, "--ylabel", ylabel], capture_output=True, text=True)
    if r.returncode != 0:
        return f"(plot {name} failed: {r.stderr.strip()})"
    return f"![{title}](plots/{name}.svg)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--mode", required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--date", required=True)
    ap.add_argument("--failed", default="")
    ap.add_argument("--generator", default="one thread, AF_PACKET `sendmmsg`")
    ap.add_argument("--load-pps", default="", help="fixed background load of sections 4 and 5")
    a = ap.parse_args()
    outdir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(os.path.join(outdir, "plots"), exist_ok=True)
    model, cores, kernel, mem = machine()
    tp = rows(os.path.join(a.data, "throughput.csv"))
    tcp = rows(os.path.join(a.data, "tcp.csv"))
    http = rows(os.path.join(a.data, "http.csv"))
    lat = rows(os.path.join(a.data, "latency.csv"))
    ctl = rows(os.path.join(a.data, "control.csv"))

    configs = []
    for r in tp:
        if r["config"] not in configs:
            configs.append(r["config"])
    sizes = []
    for r in tp:
        if r["size"] not in sizes:
            sizes.append(r["size"])
    rate = {(r["config"], r["target"], r["size"]): float(r["sink_pps"]) for r in tp}
    gen = {(r["config"], r["target"], r["size"]): float(r["gen_pps"]) for r in tp}

    L = []
    w = L.append
    w("# usnetd evaluation results\n")
    w(f"Measured {a.date} with `{a.command}` ({a.mode} run) on the virtual testbed "
      "(`tools/testbed`: two network namespaces joined by a 4-queue veth pair, offloads off).\n")
    if a.failed.strip():
        w(f"**Failed configurations (no or partial data): {a.failed.strip()}** (see the run's log).\n")
    w("## Machine\n")
    w(f"- CPU: {model}, {cores} cores")
    w(f"- Kernel: Linux {kernel}")
    if mem:
        w(f"- Memory: {mem}")
    w("")
    w("**How far these numbers carry.** Everything runs on this one machine: the generator "
      f"({a.generator}), the veth pair, the switch's workers, the kernel or "
      "client sink, and the switch's kernel side (TAP) all share the same "
      f"{cores} cores. Workers busy-poll while frames flow (and sleep in poll(2) when idle) while "
      "the generator and the sink need CPU too, so \"2 workers\" here measures contention more than scaling, "
      "and \"direct\" runs have more CPU left for the sink than runs through the switch. veth "
      "has no NIC queues or DMA: every frame is a memory copy by the sending CPU. Rates are "
      "what the sink counted between its first and last frame; the generator's own rate is "
      "shown for reference (frames it could not hand over were retried, never counted). "
      "Without the switch, veth hands each frame to the receiving stack in the sender's own "
      "softirq on the same core, so the \"direct\" kernel path shares one core with the "
      "generator; through the switch that work is split between the generator's core and the "
      "worker(s), which is why some switched rates exceed the direct ones. The direct client "
      "baseline is a single TPACKET_V3 socket that naps 200 us when its ring is empty. Points "
      "vary by 10-30% between runs on this VM; read the tables as orders of magnitude and "
      "shapes, not as precise ratios.\n")

    # 1. Throughput.
    w("## 1. Frames per second by frame size\n")
    w(f"Peer -> switch host, UDP, {os.environ.get('GEN_FLOWS', '16')} flows, generator at full speed. *direct*: no switch "
      "(kernel: a UDP socket; client: an AF_PACKET TPACKET_V3 sink on sw0). Through usnetd: "
      "*kernel* = UDP socket behind a DEBUG_PORTS rule, *uds*/*shm* = `usnetd-bench sink` as a "
      "usnetd client over the Unix-datagram or shared-memory channel. Values: received "
      "frames/s (generator frames/s in parentheses).\n")
    targets = ["kernel", "client", "uds", "shm"]
    header = "| config | target | " + " | ".join(f"{s} B" for s in sizes) + " |"
    w(header)
    w("|" + "---|" * (len(sizes) + 2))
    for c in configs:
        for t in targets:
            if not any((c, t, s) in rate for s in sizes):
                continue
            cells = []
            for s in sizes:
                if (c, t, s) in rate:
                    cells.append(f"{rate[(c, t, s)]:,.0f} ({gen[(c, t, s)]:,.0f})")
                else:
                    cells.append("-")
            w(f"| {c} | {t} | " + " | ".join(cells) + " |")
    w("")
    # Ratios against direct.
    w("Fraction of the direct rate (kernel vs direct kernel; uds/shm vs the direct AF_PACKET "
      "sink):\n")
    w("| config | target | " + " | ".join(f"{s} B" for s in sizes) + " |")
    w("|" + "---|" * (len(sizes) + 2))
    for c in configs:
        if c == "direct":
            continue
        for t in ["kernel", "uds", "shm"]:
            base_t = "kernel" if t == "kernel" else "client"
            cells = []
            for s in sizes:
                b = rate.get(("direct", base_t, s))
                v = rate.get((c, t, s))
                cells.append(f"{v / b:.0%}" if b and v is not None else "-")
            if any(x != "-" for x in cells):
                w(f"| {c} | {t} | " + " | ".join(cells) + " |")
    w("")
    # Switch CPU per frame.
    cpu = {(r["config"], r["target"], r["size"]): r.get("switch_cpu_us_per_frame", "n/a") for r in tp}
    w("The switch's CPU time per delivered frame (all its threads, user + system, from "
      "`/proc/PID/stat` over the point; microseconds):\n")
    w("| config | target | " + " | ".join(f"{s} B" for s in sizes) + " |")
    w("|" + "---|" * (len(sizes) + 2))
    for c in configs:
        if c == "direct":
            continue
        for t in ["kernel", "uds", "shm"]:
            cells = [cpu.get((c, t, s), "-") or "-" for s in sizes]
            if any(x not in ("-", "n/a") for x in cells):
                w(f"| {c} | {t} | " + " | ".join(cells) + " |")
    w("")
    for t, title in [("kernel", "to the kernel (UDP socket)"), ("uds", "to a client, UDS channel"),
                     ("shm", "to a client, shared-memory channel")]:
        pts = []
        for s in sizes:
            for c in configs:
                tt = t if c != "direct" else ("kernel" if t == "kernel" else "client")
                if (c, tt, s) in rate:
                    pts.append((s, c, rate[(c, tt, s)]))
        img = plot(a.bench, a.data, outdir, f"throughput-{t}", pts, f"Frames/s {title}",
                   "frame size (bytes)", "frames/s")
        if img:
            w(img + "\n")

    # 1b. The client channels alone.
    chan_ratio = chan_us = None
    chan = os.path.join(a.data, "channel.jsonl")
    if os.path.exists(chan):
        runs = [json.loads(l) for l in open(chan) if l.startswith("{")]
        if runs:
            w("### The client channels without a NIC\n")
            w("`usnetd-bench channel`: one thread plays a worker and hands batches of "
              f"{runs[0]['batch']} frames of {runs[0]['frame_size']} bytes to the channel exactly "
              "as the daemon creates it, as fast as it takes them; a client thread on the other "
              "core drains it with the client library and sleeps on its fd when it is empty. "
              "This is what the channels can carry, which the testbed above cannot show: its "
              "generator and the veth run out first.\n")
            w("| channel | delivered frames/s | received frames/s | switch CPU ns per frame |")
            w("|---|---|---|---|")
            for r in runs:
                w(f"| {r['kind']} | {r['delivered_pps']:,.0f} | {r['received_pps']:,.0f} | "
                  f"{r['switch_ns_per_frame']:,.0f} |")
            kinds = {r["kind"]: r for r in runs}
            if "uds" in kinds and "shm" in kinds and kinds["uds"]["delivered_pps"] > 0:
                chan_ratio = kinds["shm"]["delivered_pps"] / kinds["uds"]["delivered_pps"]
                chan_us = kinds["shm"]["switch_ns_per_frame"] / 1000
                w(f"\nShared memory against the Unix datagram channel: {chan_ratio:.1f}x the "
                  f"frames/s at {chan_us:.3f} us of switch CPU per frame (Unix datagram: "
                  f"{kinds['uds']['switch_ns_per_frame'] / 1000:.2f} us).\n")

    # 2. TCP.
    w("## 2. TCP goodput (peer -> switch host)\n")
    w("*iperf3*: iperf3 to a kernel server behind DEBUG_PORTS. *echo*: one Python client sends "
      "64 KiB writes and reads the echo back; echoed bytes per second, every byte crossing the "
      "switch twice: to a kernel echo server (python3) and to the smoltcp service's echo port on "
      "the same IP. *+ offloads*: the same with the veth's checksum and segmentation offloads on "
      "(the rest of this run has them off): the peer's TCP then sends 64 KiB super-segments, as "
      "a NIC with GRO hands them to the host; usnetd passes them whole to the kernel (vnet headers "
      "on the packet socket or macvtap and on the TAP) and cuts them in software for the smoltcp "
      "client. Direct TCP over veth with offloads on never segments at all, so it is the upper "
      "bound for the same setup.\n")
    w("| config | kernel (iperf3) | kernel (echo) | client: smoltcp (echo) |")
    w("|---|---|---|---|")
    by = {}
    for r in tcp:
        by.setdefault(r["config"], {})[r["target"]] = r["bps"]
    pts = []
    for c, d in by.items():
        k = d.get("kernel", "-")
        ke = d.get("kernel-echo", "-")
        s = d.get("smoltcp-echo", "not measured")
        try:
            ke = f"{float(ke) / 1e9:.2f} Gbit/s"
        except ValueError:
            pass
        kf = num(k, "{:.2f}")
        try:
            kf = f"{float(k) / 1e9:.2f} Gbit/s"
            pts.append(("kernel", c, float(k) / 1e9))
        except ValueError:
            pass
        try:
            s = f"{float(s) / 1e9:.2f} Gbit/s"
        except ValueError:
            pass
        w(f"| {c} | {kf} | {ke} | {s} |")
    w("")
    img = plot(a.bench, a.data, outdir, "tcp", pts, "TCP goodput", "", "Gbit/s")
    if img:
        w(img + "\n")

    # 3. HTTP.
    w("## 3. HTTP requests/s (wrk -t1 -c8, 512-byte page from python3 -m http.server)\n")
    w("| config | kernel | client (smoltcp) | errors |")
    w("|---|---|---|---|")
    hb = {}
    for r in http:
        hb.setdefault(r["config"], {})[r["target"]] = r
    for c, d in hb.items():
        k = d.get("kernel", {})
        s = d.get("smoltcp", {}).get("rps", "not measured" if c != "direct" else "n/a")
        w(f"| {c} | {num(k.get('rps', '-'))} | {s} | {k.get('errors', '')} |")
    w("")
    w("python3's http.server is the bottleneck here (single process, CPU-bound), so this "
      "mostly shows that the switch does not get in its way.\n")

    # 4. Latency.
    w("## 4. UDP round-trip time (1000 probes/s, peer -> kernel echo on a DEBUG_PORTS port)\n")
    if a.load_pps:
        w(f"*half*: with a background generator at {a.load_pps} frames/s (the same for every "
          "configuration, `--load-pps`) to another kernel UDP port.\n")
    else:
        w("*half*: with a background generator at half of the configuration's own 64-byte kernel "
          "rate (from section 1) to another kernel UDP port.\n")
    w("The background generator runs as SCHED_IDLE: it stands in for traffic from another "
      "machine and must not hold a core that the switch or the endpoints want (a busy thread "
      "of the default policy delays what wakes on its core by up to a scheduler tick, 4 ms "
      "here). *reached* is the rate it sent at.\n")
    w("| config | load | background frames/s | reached | sent | answered | p50 us | p90 us | p99 us | p99.9 us | max us |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    pts = []
    direct_p99 = {}
    for r in lat:
        w(f"| {r['config']} | {r['load']} | {num(r['load_pps'])} | {num(r.get('load_sent_pps', ''))} | {r['sent']} | {r['received']} | "
          f"{num(r['p50'], '{:.1f}')} | {num(r['p90'], '{:.1f}')} | {num(r['p99'], '{:.1f}')} | "
          f"{num(r['p999'], '{:.1f}')} | {num(r['max'], '{:.1f}')} |")
        pts.append((r["load"], r["config"], r["p99"]))
        if r["config"] == "direct":
            direct_p99[r["load"]] = float(r["p99"])
    w("")
    if direct_p99:
        w("Added p99 latency against direct:\n")
        w("| config | idle | half load |")
        w("|---|---|---|")
        added = {}
        for r in lat:
            if r["config"] != "direct" and r["load"] in direct_p99:
                added.setdefault(r["config"], {})[r["load"]] = float(r["p99"]) - direct_p99[r["load"]]
        for c, d in added.items():
            w(f"| {c} | {d.get('idle', float('nan')):+.1f} us | {d.get('half', float('nan')):+.1f} us |")
        w("")
    wake = os.path.join(a.data, "wakeup.json")
    if os.path.exists(wake):
        wu = json.load(open(wake))
        p = wu["wakeup_us"]
        w(f"**The unit of added latency.** Waking a thread blocked in `recv` on another core "
          f"that has gone idle (`usnetd-bench wakeup`, core {wu['from']} -> {wu['to']}, rounds "
          f"{wu['gap_us']} us apart) takes p50 {p['p50']:.1f} us, p90 {p['p90']:.1f} us, p99 "
          f"{p['p99']:.1f} us here: an idle virtual CPU is halted and runs again only after an "
          "interrupt through the hypervisor. Direct, a probe wakes two threads (the echo server, "
          "then the prober); through the switch at least three more: the worker that reads the "
          "NIC queue, the core that takes the TAP's frames (RPS; or the echo server's core when "
          "RPS is off), and the kernel-side worker that reads the answer from the TAP. On cores "
          "dedicated to the switch, workers that poll (`IDLE_SPIN_US`) save their two; on this "
          "2-core VM a polling worker takes the core the others need, which costs more.\n")
    img = plot(a.bench, a.data, outdir, "latency-p99", pts, "UDP RTT p99", "load", "microseconds")
    if img:
        w(img + "\n")

    # 5. Control plane.
    w("## 5. Control plane\n")
    w("AddMatch: one client registers listening UDP rules on consecutive ports, one request at "
      "a time (round trip over the control socket). Learned flows: the switch host's kernel "
      "opens UDP flows (one datagram each, paced) to the peer while the background generator "
      "runs at half load; rules counted from stats.json (rewritten once a second, so the time "
      "has about one second of resolution).\n")
    w("| config | AddMatch n | p50 us | p90 us | p99 us | p99.9 us | max us | AddMatch/s | flows offered | offered/s | rules learned | seconds | learned/s |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ctl:
        try:
            lps = float(r["rules_learned"]) / float(r["learn_seconds"])
        except (ValueError, ZeroDivisionError):
            lps = float("nan")
        w(f"| {r['config']} | {r['addmatch']} | {num(r['p50'], '{:.1f}')} | {num(r['p90'], '{:.1f}')} | "
          f"{num(r['p99'], '{:.1f}')} | {num(r['p999'], '{:.1f}')} | {num(r['max'], '{:.1f}')} | "
          f"{num(r['addmatch_per_s'])} | {r['flows']} | {num(r['flows_per_s'])} | {r['rules_learned']} | "
          f"{num(r['learn_seconds'], '{:.1f}')} | {lps:,.0f} |")
    w("")

    # Targets.
    w("## Targets of issue 4\n")
    t4 = []
    if chan_ratio is not None:
        ok = chan_ratio >= 3 and chan_us <= 0.5
        t4.append(f"- the channels alone (`usnetd-bench channel`, 64 B): shm {chan_ratio:.1f}x the "
                  f"Unix datagram channel at {chan_us:.3f} us of switch CPU per frame (target >= 3x "
                  f"at <= 0.5 us): {'met' if ok else 'not met'}")
    for c in configs:
        u, m = rate.get((c, "uds", "64")), rate.get((c, "shm", "64"))
        us = num(cpu.get((c, "shm", "64"), ""), "{:.2f}")
        if u and m:
            t4.append(f"- {c} on the testbed, 64 B: shm {m / u:.1f}x uds"
                      + (f" at {us} us of switch CPU per frame" if us not in ("", "n/a") else "")
                      + " (the generator, not the channel, is the limit here: see section 1)")
    w("\n".join(t4) + "\n" if t4 else "No channel figures in this run.\n")

    w("## Targets of issue 6\n")
    tgt = []
    for c in configs:
        if c.endswith("/2w"):
            b = rate.get(("direct", "client", "64"))
            v = rate.get((c, "shm", "64"))
            if b and v is not None:
                tgt.append(f"- {c}, 64-byte frames to a client over shm: {v / b:.0%} of direct "
                           f"(target >= 80%): {'met' if v / b >= 0.8 else 'not met'}")
    for c, d in by.items():
        if c.split(" ")[0] == "direct":
            continue
        try:
            g = float(d.get("kernel")) / 1e9
            tgt.append(f"- {c}, TCP to the kernel: {g:.2f} Gbit/s (target >= 4): "
                       f"{'met' if g >= 4 else 'not met'}")
        except (TypeError, ValueError):
            pass
    for r in lat:
        if r["config"] != "direct" and r["load"] == "half" and "half" in direct_p99:
            added = float(r["p99"]) - direct_p99["half"]
            tgt.append(f"- {r['config']}, added p99 RTT at half load: {added:+.1f} us "
                       f"(target < 50 us): {'met' if added < 50 else 'not met'}")
    L.extend(tgt or ["- (no data)"])
    w("")
    w("Raw data: the CSV files eval/run collected are reproduced below.\n")
    for name in ["throughput", "tcp", "http", "latency", "control"]:
        p = os.path.join(a.data, name + ".csv")
        if os.path.exists(p):
            w(f"<details><summary>{name}.csv</summary>\n\n```\n{open(p).read().strip()}\n```\n</details>\n")
    with open(a.out, "w") as f:
        f.write("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
