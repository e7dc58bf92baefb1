# Python state a restore must preserve: a 100k-entry dict, a generator
# mid-iteration, a thread. Appends one line per step to argv[1], then "done".
import sys, threading, time, hashlib
d = {i: str(i * 7) for i in range(100_000)}
def gen():
    i = 0
    while True:
        yield i
        i += 1
g = gen()
out = sys.argv[1]
stop = threading.Event()
counter = [0]
def worker():
    while not stop.is_set():
        counter[0] += 1
        time.sleep(0.01)
t = threading.Thread(target=worker, daemon=True)
t.start()
for step in range(60):
    v = next(g)
    h = hashlib.sha256(repr(sorted(d.items())[:1000]).encode()).hexdigest()[:12]
    with open(out, "a") as f:
        f.write(f"step {step} gen={v} dict={len(d)} h={h} worker={counter[0]}\n")
    d[100_000 + step] = "x"
    time.sleep(0.1)
with open(out, "a") as f:
    f.write("done\n")
