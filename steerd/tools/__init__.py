"""Operator tools: ``steerd classify`` (first flights in a capture), ``pcap`` (its reader)
and ``steerd doctor`` (what this machine can run). Root only where they load BPF (doctor).
"""
