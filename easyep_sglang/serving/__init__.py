"""Serving through SGLang: the launcher and its checks, the in-process engine, server processes, the calibration driver."""
