"""Reference early-exit models in PyTorch and their ONNX export (torch needed: the ``train`` extra).

Import the submodules directly (``eecompile.models.resnet``, ``.transformer``, ``.export``); this package
imports nothing, so ``import eecompile`` never pulls in torch.
"""
