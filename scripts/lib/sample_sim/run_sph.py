"""A toy SPH "simulation" for the demo: writes outputs shaped like a real solver's.

Usage: python3 run_sph.py [STEPS] [SECONDS_PER_STEP]

Writes ParticleData_Fluid_<n>.vtk snapshots (legacy ASCII VTK) under vtk/, a solver log under
log/SPH_log.txt, progress on stdout and warnings on stderr; the task's stdout.txt/stderr.txt
collect the two streams.
"""

import math
import os
import sys
import time

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
pause = float(sys.argv[2]) if len(sys.argv) > 2 else 0.2
particles = 400

os.makedirs("vtk", exist_ok=True)
os.makedirs("log", exist_ok=True)
with open(os.path.join("log", "SPH_log.txt"), "w") as log:
    log.write(f"SPH solver 1.0: {particles} particles, {steps} steps\n")
    for step in range(steps + 1):
        t = step * 0.01
        path = os.path.join("vtk", f"ParticleData_Fluid_{step}.vtk")
        with open(path, "w") as vtk:
            vtk.write("# vtk DataFile Version 3.0\n")
            vtk.write(f"ParticleData step {step}\nASCII\nDATASET POLYDATA\n")
            vtk.write(f"POINTS {particles} float\n")
            for i in range(particles):
                x = (i % 20) * 0.05
                y = (i // 20) * 0.05 + 0.02 * math.sin(6.0 * x + 9.0 * t)
                vtk.write(f"{x:.6f} {y:.6f} 0.000000\n")
            vtk.write(f"POINT_DATA {particles}\nSCALARS Pressure float 1\nLOOKUP_TABLE default\n")
            for i in range(particles):
                vtk.write(f"{1000.0 + 9.81 * ((i // 20) * 0.05):.4f}\n")
        log.write(f"step {step:5d}  t={t:.3f}  written {path}\n")
        log.flush()
        print(f"[sph] step {step}/{steps} t={t:.3f}", flush=True)
        if step == steps // 2:
            print("[sph] warning: CFL number close to limit", file=sys.stderr, flush=True)
        time.sleep(pause)
print("[sph] simulation finished", flush=True)
