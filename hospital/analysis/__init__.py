"""The hospital side of the confidential analytics (``pacegate analyze``).

Stream readings out of the encrypted store, pack them into CKKS vectors (one vector per
lane: heart rate, age, out-of-range indicator, one indicator per age band), send them to
the cloud worker, which sums them and their products slot-wise *blind*; fetch the
encrypted sums, decrypt them, finish the slot sums, derive the statistics, and check
each one against the same statistic computed here in plaintext. Decrypted results never
go back to the cloud. Memory is bounded by one batch of :data:`pacegate.ckks.SLOTS`
readings, whatever the number of readings.

One module per job:

- :mod:`~hospital.analysis.settings`: the ``analysis:`` section of hospital.yaml;
- :mod:`~hospital.analysis.lanes`: plaintext reference sums, lane packing, statistics (pure);
- :mod:`~hospital.analysis.rows`: rows out of the store, in this process or a process pool;
- :mod:`~hospital.analysis.transport`: what the session needs from the channel;
- :mod:`~hospital.analysis.conversation`: the session with the cloud worker;
- :mod:`~hospital.analysis.report`: what an analysis found, against the tolerance;
- :mod:`~hospital.analysis.job`: one analysis of the store a hospital config names.
"""
