"""ZipVoice / ZipVoice-Dialog / ZipVoice-Dialog-Stereo: models, checkpoints, sampling, trainer."""
