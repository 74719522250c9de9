#!/usr/bin/env python3
"""Runs a command and prints, on stderr, the CPU seconds each process (grouped
by name; `micro8gents serve` and `micro8gents work` apart) used while it ran,
sampled from /proc every 0.2 s. Where the time of a bench run goes:

    scripts/bench-cpu.py target/release/examples/bench --no-ceilings --serve 1 --work 1

Processes of other users of the machine (a compiler) show up too: read the
ones you care about, and the machine's busy/idle total.
"""
import os, subprocess, sys, time, collections
HZ = os.sysconf('SC_CLK_TCK')
def snap():
    out = {}
    for pid in os.listdir('/proc'):
        if not pid.isdigit(): continue
        try:
            with open(f'/proc/{pid}/stat') as f: s = f.read()
            with open(f'/proc/{pid}/cmdline','rb') as f: cmd = f.read().split(b'\0')
        except OSError: continue
        comm = s[s.index('(')+1:s.rindex(')')]
        rest = s[s.rindex(')')+2:].split()
        ticks = int(rest[11]) + int(rest[12])
        name = comm
        if comm == 'micro8gents' and len(cmd) > 1: name = 'micro8gents ' + cmd[1].decode()
        out[int(pid)] = (name, ticks)
    return out
base = snap()
with open('/proc/stat') as f: total0 = [int(x) for x in f.readline().split()[1:]]
p = subprocess.Popen(sys.argv[1:])
last = dict(base)
while p.poll() is None:
    time.sleep(0.2)
    for pid, v in snap().items(): last[pid] = v
with open('/proc/stat') as f: total1 = [int(x) for x in f.readline().split()[1:]]
use = collections.Counter()
for pid, (name, t) in last.items():
    t0 = base.get(pid, (name, 0))[1] if pid in base and base[pid][0] == name else 0
    use[name] += (t - t0) / HZ
busy = (sum(total1[:3]) + sum(total1[5:8]) - sum(total0[:3]) - sum(total0[5:8])) / HZ
idle = (total1[3] + total1[4] - total0[3] - total0[4]) / HZ
print(f"cpu: machine busy {busy:.1f}s idle {idle:.1f}s (both cores)", file=sys.stderr)
for name, s in use.most_common(12):
    if s > 0.05: print(f"cpu: {name:30s} {s:7.1f}s", file=sys.stderr)
sys.exit(p.returncode)
