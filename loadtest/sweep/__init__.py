"""Load sweeps: fixed-rate SIPp steps against sipcluster and Kamailio.

Usage (from the project root, with the project's virtual environment)::

    .venv/bin/python -m loadtest.sweep --target both
    .venv/bin/python -m loadtest.sweep --target sipcluster --workloads register \\
        --step-seconds 10 --rates register=1000,2000

For each target (``--target sipcluster|kamailio|both``) and each workload
(``register``: REGISTER without auth; ``register-digest``: a full digest
registration, 401 then 200; ``calls``: INVITE..BYE through the record-routing
proxy over UDP; ``calls-tcp``: the same over one TCP connection) the sweep

1. starts the target fresh (``_targets``): sipcluster with ``--workers 2`` and an
   etcd of its own, or Kamailio with loadtest/kamailio/kamailio.cfg, and
   provisions the users (etcd records / an htable file);
2. for calls, registers the callees from the port where it then starts the UAS
   SIPp (loadtest/sipp/uas.xml);
3. climbs the rate ladder in fixed-rate steps (RFC 7502 style, ``_steps``),
   stopping at the first rate that fails twice, then bisects once between the
   last passing and the first failing rate;
4. prints a row per step (achieved rate, failures, p50/p99, server CPU per
   operation, cores, SIPp's cores, UDP receive-buffer errors, the busiest server
   process) and, at the end, the highest passing rate per workload and target.

Every process it starts runs in its own session and is stopped by pid at the
end, on an error, on Ctrl-C or SIGTERM; every SIPp run is bounded by a call
count (-m) and a time limit (-timeout), and the whole sweep by --max-minutes.
Results go to ``results.json`` and ``summary.txt`` in the run directory with
each step's SIPp command, statistics and response times.
"""

__all__: list[str] = []
