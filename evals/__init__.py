"""Benchmark scoring (GenEval, DPG-Bench, WISE) on Ray actor pools."""
