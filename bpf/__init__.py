"""eBPF programs of the suite: C sources (bpf_*.c over lib/*.h), their map layouts in
Python (maps.py), the bpf(2) calls (syscall.py), the bcc loader (loader.py), cgroup
handling for socket hooks (cgroup.py) and what bcc needs on a machine (setup.py)."""
