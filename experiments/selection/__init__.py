"""Does `python -m jaxsft.select` rank pretrained candidates the way fine-tuning does?"""
