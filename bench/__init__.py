"""AgentChat's load bench: workloads, load generator processes, and side-by-side peer servers.

Run ``python -m bench run <workload>``; see bench/README.md.
"""
