"""Shared maths used by several methods: blur, Gaussians, kNN search, coreset sampling."""
