"""The SimPy discrete-event simulator: runs sagellm.core policies against cost models."""
