"""OTAvatar (Ma et al., "OTAvatar: One-shot Talking Face Avatar with Controllable Tri-plane
Rendering", CVPR 2023) as a pyface model:

* ``pyface train otavatar`` (:class:`~pyface.models.otavatar.model.OTAvatar`): an EG3D generator
  (a converted release or a ``pyface train eg3d`` run, stage ``eg3d``) fine-tuned with
  :class:`pyface.nn.MotionController` by decoupling-by-inverting;
* :class:`~pyface.models.otavatar.pipeline.OTAvatarPipeline`: one-shot inversion of the source,
  animation by 3DMM motion windows (``pyface animate otavatar``, ``pyface eval otavatar``);
* ``pyface convert otavatar CKPT OUT`` (:mod:`pyface.models.otavatar.convert`) for the authors'
  released checkpoint.

See docs/models/otavatar.md. Reproduces the semantics of theEricMa/OTAvatar (CC BY-NC-SA 4.0);
the code is pyface's own. Importing this package imports nothing heavy.
"""
