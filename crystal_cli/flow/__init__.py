"""FlowLLM refiner: Riemannian flow matching from LLM samples to crystals (manifolds, pairs, network,
training, ODE). Submodules import torch; import them where needed, not from this package root."""
