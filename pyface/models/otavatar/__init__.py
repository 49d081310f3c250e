"""OTAvatar (Ma et al., "OTAvatar: One-shot Talking Face Avatar with Controllable Tri-plane
Rendering", CVPR 2023). Landed so far: the converter of the authors' released checkpoint
(``pyface convert otavatar CKPT OUT``, :mod:`pyface.models.otavatar.convert`); the controller
itself is :class:`pyface.nn.MotionController`. See docs/models/otavatar.md.

Reproduces the semantics of theEricMa/OTAvatar (CC BY-NC-SA 4.0); the code is pyface's own.
Importing this package imports nothing heavy.
"""
