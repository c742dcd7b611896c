"""`treadle bench agents`: agent programs (workloads) on a simulated cluster, each system's
scheduling, the simulation that plays them.
"""
