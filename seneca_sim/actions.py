"""The actions the counting simulator counts, in the order of its count arrays' last axis (the
table at the top of :mod:`seneca_sim.counting` says how each is counted and priced). A module of
its own so that the simulator and its reports share the names without importing each other."""

ACTIONS = ("event_ingest", "weight_read", "mac", "psum_ingest", "value_ingest", "neuron_update", "threshold_compare",
           "event_generate", "state_read", "state_write", "noc_flit_hop", "chip_flit_hop", "leakage",
           "shared_read_bit", "buffer_write")
(A_INGEST, A_WREAD, A_MAC, A_PSUM, A_VALUE, A_NEURON, A_THRESH, A_EVGEN, A_SREAD, A_SWRITE, A_NOC, A_CHIP,
 A_LEAK, A_SHARED, A_BUFW) = range(len(ACTIONS))
N_ACTIONS = len(ACTIONS)
