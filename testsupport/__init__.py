"""This repository's test and benchmark harness, kept out of the vectorlay wheel: real-process
stacks, a fault-injecting relay, scripted servers and upstreams, load, image building, a fleet
simulator and the end-to-end GPU check. Importable from a checkout's root (pytest's `pythonpath`,
bench scripts, `python -m testsupport.X`)."""
