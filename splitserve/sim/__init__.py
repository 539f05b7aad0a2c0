"""The serving simulator: a discrete-event model of prefill and decode instances timed by fitted
latency profiles (DistServe's published ones, or splitserve's own), fed by the load tester's
workloads and arrivals, placing requests with the router's own decision code (its ranking
functions; in elastic mode the Placer's ``choose_placement`` and the role balancer's
``balanced_move``), and writing the load tester's result schema (``splitserve simulate``;
docs/simulator.md)."""
