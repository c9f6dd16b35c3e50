"""instructgpt: the InstructGPT loop (Ouyang et al. 2022) on Hugging Face models, from demonstrations to a served,
aligned model.

Architecture, in layers; a module imports only from its own layer or the ones above it, and a stage never imports
another stage:

1. math (pure functions of tensors; import only torch): ``losses``, ``advantages``, ``kl_control``.
2. components:
   - configuration and run directories: ``config``, ``files``, ``runs``, ``progress``;
   - data and text: ``data`` (every input format), ``prompting`` (chat templates), ``batching`` (examples, packing,
     padding);
   - models: ``modeling`` (load, save, LoRA, log-probs), ``gguf_checkpoint``, ``generation`` (the sampler),
     ``reward`` (the reward model), ``policy`` (policy and critic forwards), ``judges`` (scores beside the RM);
   - training mechanics: ``training`` (accelerator, optimizer, schedule, data order, resume, checkpoints, EMA);
   - the loops two stages share: ``supervised`` (SFT, pretraining), ``rankings`` (RM, DPO); and PPO's parts:
     ``ppo_config``, ``monitor``.
3. stages, one loop each (``instructgpt <stage>``): ``pretrain``, ``sft``, ``rm``, ``ppo``, ``dpo``.
4. applications: ``pipeline`` (the whole loop), ``evaluate`` and ``report``, ``label_sim``, ``generate_cli``,
   ``serving`` (the OpenAI-compatible API), ``labeling`` (the labeling web app), ``cli`` (the command dispatcher).

The built-in world (``builtin``, ``gold``, ``assistant``, ``constraints``, ``tasks``) is the data and the hidden gold
labeler of the default job: the built-in sources enter through ``data`` (``builtin:...``), the gold labeler through
``judges``; no stage knows it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("instructgpt")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0"
