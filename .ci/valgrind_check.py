"""Read a memcheck log and fail on any error record whose stack passes through moe's
extension (moe._C / moe_* functions); errors wholly inside the interpreter or NumPy are
listed but not ours to fix."""
import re
import sys

text = open(sys.argv[1]).read()
records = re.split(r"\n==\d+== \n", text)
ours, others = [], []
for rec in records:
    if not re.search(r"(Invalid (read|write|free)|uninitialised|definitely lost|"
                     r"Mismatched free|overlap)", rec):
        continue
    (ours if re.search(r"(_C\.cpython|\bmoe_\w+)", rec) else others).append(rec)
summary = re.findall(r"ERROR SUMMARY: .*", text)
print(f"memcheck: {len(ours)} error record(s) in moe, {len(others)} elsewhere; "
      f"{summary[-1] if summary else ''}")
for rec in ours:
    print(rec)
if "valgrind workload done" not in text and "Exit program on first error" not in text:
    pass
sys.exit(1 if ours else 0)
