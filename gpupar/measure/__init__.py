"""Measuring a step: its FLOPs, and the peak rate of the device it runs on."""
