"""Integrations of the AdaCache backend with model libraries (``adacache_fx.integrations.diffusers``)."""
