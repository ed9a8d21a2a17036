# Session 28: the ratios over several bench reports (projected from the median run's
# clocks, and from each rank's fastest clock per layer), with the ideal at each report's rates.
# Run: .venv/bin/python docs/results/bench13/summary_s28.py REPORT.json ... > summary_s28.txt
import json, statistics as st, sys
rows = []
for f in sys.argv[1:]:
    d = json.load(open(f)); R = {r['method']: r for r in d['results']}
    a, s, g = R['apb'], R['spava'], R['ring']
    rows.append((f.split('/')[-1], g['projected_s'], a['projected_s'], s['projected_s'], g['projected_s'] / a['projected_s'],
                 g['ideal_s'] / a['ideal_s'], a['projected_s'] / s['projected_s'], a['ideal_s'] / s['ideal_s'],
                 g['projected_fastest_s'] / a['projected_fastest_s'], a['projected_fastest_s'] / s['projected_fastest_s'],
                 max(max(r['rank_peak_mem_mib']) for r in (a, s, g)), d['rates_drift']))
print(f"{'report':<38}{'ring s':>8}{'apb s':>8}{'spava s':>8}{'apb/ring':>9}{'ideal':>7}{'spava/apb':>10}{'ideal':>7}{'fastest a/r':>12}{'s/a':>6}{'peak MiB':>9}{'drift':>6}")
for r in rows:
    print(f"{r[0]:<38}{r[1]:>8.3f}{r[2]:>8.3f}{r[3]:>8.3f}{r[4]:>9.3f}{r[5]:>7.3f}{r[6]:>10.3f}{r[7]:>7.3f}{r[8]:>12.3f}{r[9]:>6.3f}{r[10]:>9.0f}{r[11]:>6.2f}")
for i, name in [(4, 'apb vs ring'), (6, 'spava vs apb'), (8, 'apb vs ring, fastest-of'), (9, 'spava vs apb, fastest-of')]:
    v = [r[i] for r in rows]
    print(f"{name}: median {st.median(v):.3f}, range {min(v):.3f}-{max(v):.3f}, at or above target {sum(x >= (2.2 if 'ring' in name else 1.4) - 5e-4 for x in v)} of {len(v)}")
