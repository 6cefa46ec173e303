"""minroentgen: RoentGen (Stable Diffusion fine-tuned on chest X-rays) from scratch."""
