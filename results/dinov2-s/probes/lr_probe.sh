#!/bin/bash
# lr probe: DINOv2-S at 56 px on cifar10, 2000 train images, 3 epochs, batch 32
cd /work/main
W=../shared/models/vit_small_patch14_dinov2.safetensors
for lr in $LRS; do
  o=/work/probes/c10-lr$lr.safetensors
  /usr/bin/time -f "%e s" qvec finetune -m timm:vit_small_patch14_dinov2 --weights $W --img-size 56 -t cifar10 -d ../shared/data \
    --lr $lr --epochs 3 --batch-size 32 --warmup 20 --train-limit 2000 --threads 2 -q -o $o
  for b in 3 2; do qvec eval -m $o -t cifar10 -d ../shared/data --bits $b --limit 500 --threads 2; done
  qvec eval -m $o -t cifar10 -d ../shared/data --limit 500 --threads 2
done
