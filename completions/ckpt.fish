# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_ckpt_global_optspecs
    string join \n device= threads= q/quiet kernels= h/help V/version
end

function __fish_ckpt_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_ckpt_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_ckpt_using_subcommand
    set -l cmd (__fish_ckpt_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c ckpt -n "__fish_ckpt_needs_command" -l device -d 'Device for forward passes: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present, else the CPU)' -r
complete -c ckpt -n "__fish_ckpt_needs_command" -l threads -d 'Worker threads (default: one per core)' -r
complete -c ckpt -n "__fish_ckpt_needs_command" -l kernels -d 'Kernels of the forward passes on the CPU: fast (ckpt\'s own) or candle (candle\'s ops, the path CUDA takes; for comparisons)' -r
complete -c ckpt -n "__fish_ckpt_needs_command" -s q -l quiet -d 'Print results, warnings and errors only: no notes, no progress bars'
complete -c ckpt -n "__fish_ckpt_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ckpt -n "__fish_ckpt_needs_command" -s V -l version -d 'Print version'
complete -c ckpt -n "__fish_ckpt_needs_command" -f -a "inspect" -d 'Show a checkpoint\'s format, tensors, parameter count, BatchNorm layers and provenance'
complete -c ckpt -n "__fish_ckpt_needs_command" -f -a "swa" -d 'Average snapshots (stochastic weight averaging), streaming, in f64'
complete -c ckpt -n "__fish_ckpt_needs_command" -f -a "ema" -d 'Exponential moving average over saved snapshots, several decays in one pass'
complete -c ckpt -n "__fish_ckpt_needs_command" -f -a "logits" -d 'Compute a model\'s logits for a batch of images'
complete -c ckpt -n "__fish_ckpt_needs_command" -f -a "eval" -d 'Evaluate a checkpoint on an ImageFolder: top-1, top-5, loss'
complete -c ckpt -n "__fish_ckpt_needs_command" -f -a "recal-bn" -d 'Recompute BatchNorm running statistics over images (precise BN)'
complete -c ckpt -n "__fish_ckpt_needs_command" -f -a "sweep-res" -d 'Accuracy at several test sizes (and crop fractions) in one pass over the images'
complete -c ckpt -n "__fish_ckpt_needs_command" -f -a "fixres" -d 'Fine-tune the classifier at the test resolution (FixRes)'
complete -c ckpt -n "__fish_ckpt_needs_command" -f -a "soup" -d 'Greedy model soups and best-of selection on a validation folder, BN-aware'
complete -c ckpt -n "__fish_ckpt_needs_command" -f -a "distill" -d 'Distil one or more teachers into a student checkpoint (knowledge distillation)'
complete -c ckpt -n "__fish_ckpt_needs_command" -f -a "completions" -d 'Print a shell completion script (bash, zsh or fish) to standard output'
complete -c ckpt -n "__fish_ckpt_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c ckpt -n "__fish_ckpt_using_subcommand inspect" -l key -d 'Key of the state dict inside a torch.save training checkpoint (nested keys as a.b). Default: the first of state_dict_ema, model_ema, state_dict, model, module that is present' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand inspect" -l strip-prefix -d 'Also remove this prefix from every key (every key must carry it), e.g. model' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand inspect" -l json -d 'Print the result as JSON instead of text; --json=FILE writes it to FILE instead' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand inspect" -l device -d 'Device for forward passes: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present, else the CPU)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand inspect" -l threads -d 'Worker threads (default: one per core)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand inspect" -l kernels -d 'Kernels of the forward passes on the CPU: fast (ckpt\'s own) or candle (candle\'s ops, the path CUDA takes; for comparisons)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand inspect" -l keep-prefix -d 'Keep the names as stored: wrapper prefixes (module. of DDP and AveragedModel, whose n_averaged then stays a tensor; _orig_mod. of torch.compile; a Lightning module\'s attribute) are otherwise removed when every key carries them, and commands that run the model also remove a prefix that makes the names fit an architecture'
complete -c ckpt -n "__fish_ckpt_using_subcommand inspect" -l tensors -d 'List every tensor with its dtype and shape'
complete -c ckpt -n "__fish_ckpt_using_subcommand inspect" -l force -d 'Replace an existing --json=FILE'
complete -c ckpt -n "__fish_ckpt_using_subcommand inspect" -s q -l quiet -d 'Print results, warnings and errors only: no notes, no progress bars'
complete -c ckpt -n "__fish_ckpt_using_subcommand inspect" -s h -l help -d 'Print help'
complete -c ckpt -n "__fish_ckpt_using_subcommand inspect" -s V -l version -d 'Print version'
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l last -d 'Keep only the N newest snapshots (applied after --every)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l every -d 'Keep every K-th snapshot, counted back from the newest (which is always kept)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l key -d 'Key of the state dict inside a torch.save training checkpoint (nested keys as a.b). Default: the first of state_dict_ema, model_ema, state_dict, model, module that is present' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l strip-prefix -d 'Also remove this prefix from every key (every key must carry it), e.g. model' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l weights -d 'Weights, one per chosen snapshot (oldest first), normalised to sum 1: 1,1,2 gives 0.25,0.25,0.5' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l int -d 'Integer tensors (num_batches_tracked) are never averaged: take the newest snapshot\'s value (last), the oldest\'s (first), the element-wise max or sum, or refuse them (error)' -r -f -a "first\t'Take the oldest snapshot\'s value'
last\t'Take the newest snapshot\'s value'
max\t'Element-wise maximum'
sum\t'Element-wise sum (an error if it overflows the dtype)'
error\t'Refuse integer tensors'"
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l dtype -d 'Output dtype of floating tensors: f32, f16, bf16 or f64 (default: as stored). The average is accumulated in f64 and rounded once' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -s o -l output -d 'Output checkpoint (safetensors). With sharding: a folder, or a name for the index. A folder (DIR/, or one that exists) is written as a model folder: model.safetensors (or shards and their index) and the first input\'s config.json when it is a model folder' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l shard-size -d 'Write shards of at most this size plus an index, e.g. 2GB or 500MB (default: shard when the input was sharded, at 5GB)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l recal-bn -d 'Recompute the BatchNorm statistics of the averaged weights over the images in DIR (precise BN, as `ckpt recal-bn`) before writing; the data options below apply' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l estimator -d 'Estimator for --recal-bn (see `ckpt recal-bn --help`)' -r -f -a "population\t'fvcore\'s precise BN: statistics of all elements seen, weighted by count'
torch\t'torch.optim.swa_utils.update_bn: mean of batch means and of unbiased batch variances'"
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l arch -d 'Architecture, instead of recognising it from the tensors: a family (resnet, mobilenet_v2, efficientnet), a torchvision name (resnet50, efficientnet_b0, ...) or a timm name (regnety_004, tf_efficientnetv2_s, tf_mobilenetv3, ...: a tf_ port\'s padding and BN eps come only from its name)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l size -d 'Side of the square images fed to the model (default: 224, or a model folder\'s input_size)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l crop-pct -d 'Eval transform: resize to floor(S / P), then crop S x S from the centre (sweep-res takes a list: P1,P2,...) (default: 0.875, or a model folder\'s crop_pct)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l interpolation -d 'Resampling filter, antialiased as PIL\'s when downscaling (default: bilinear, or a model folder\'s interpolation)' -r -f -a "bilinear\t'PIL\'s BILINEAR (triangle filter, antialiased): torchvision\'s default'
bicubic\t'PIL\'s BICUBIC (Keys cubic, a = -0.5, antialiased): timm\'s usual choice'"
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l crop-mode -d 'Eval transform: center keeps the aspect ratio (shorter side to floor(S / P)), squash resizes both sides to floor(S / P); timm\'s crop modes (default: center, or a model folder\'s crop_mode)' -r -f -a "center\t'Resize the shorter side to size / crop_pct keeping the aspect ratio, then crop the centre'
squash\t'Resize both sides to size / crop_pct (aspect ratio not kept), then crop the centre'"
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l mean -d 'Per-channel means subtracted after scaling to [0, 1] (default: ImageNet\'s, or a model folder\'s mean)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l std -d 'Per-channel standard deviations divided by (default: ImageNet\'s, or a model folder\'s std)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l transform -d 'eval: resize, centre crop (--crop-pct, --crop-mode); train: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, seeded by --seed per image' -r -f -a "eval\t'Resize and centre crop (deterministic)'
train\t'Random resized crop and flip (seeded)'"
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l seed -d 'Seed of --max-images\' subset and of the train transform' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l max-image-pixels -d 'Refuse images whose header claims more than N pixels (decompression bombs), before decoding them; the default is PIL\'s limit (2 x Image.MAX_IMAGE_PIXELS); `none` for no limit' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l shard -d 'Recalibrate over only every n-th batch of DIR, starting at the i-th (0-based): the batches one of n machines would see' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l max-images -d 'Read at most N images: a random subset (seeded by --seed) when the folder has more, kept in folder order' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l batch-size -d 'Images per batch' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l device -d 'Device for forward passes: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present, else the CPU)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l threads -d 'Worker threads (default: one per core)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l kernels -d 'Kernels of the forward passes on the CPU: fast (ckpt\'s own) or candle (candle\'s ops, the path CUDA takes; for comparisons)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l no-sort -d 'Keep the order given instead of sorting by file name'
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l keep-prefix -d 'Keep the names as stored: wrapper prefixes (module. of DDP and AveragedModel, whose n_averaged then stays a tensor; _orig_mod. of torch.compile; a Lightning module\'s attribute) are otherwise removed when every key carries them, and commands that run the model also remove a prefix that makes the names fit an architecture'
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l allow-missing -d 'Average a tensor over the snapshots that have it (weights renormalised) instead of refusing snapshots with different tensors'
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l allow-nonfinite -d 'Average NaN and infinite values instead of refusing them'
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l force -d 'Replace an existing output (atomically)'
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l skip-bad -d 'Skip images that cannot be read or decoded (counted in the summary) instead of stopping'
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -l exif-transpose -d 'Rotate and flip images by their EXIF orientation (torchvision\'s loader ignores it)'
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -s q -l quiet -d 'Print results, warnings and errors only: no notes, no progress bars'
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ckpt -n "__fish_ckpt_using_subcommand swa" -s V -l version -d 'Print version'
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l last -d 'Keep only the N newest snapshots (applied after --every)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l every -d 'Keep every K-th snapshot, counted back from the newest (which is always kept)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l key -d 'Key of the state dict inside a torch.save training checkpoint (nested keys as a.b). Default: the first of state_dict_ema, model_ema, state_dict, model, module that is present' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l strip-prefix -d 'Also remove this prefix from every key (every key must carry it), e.g. model' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l decay -d 'Decay(s) B in [0, 1); several give several outputs (name them with {decay} in -o)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l int -d 'Integer tensors (num_batches_tracked) are never averaged: take the newest snapshot\'s value (last), the oldest\'s (first), the element-wise max or sum, or refuse them (error)' -r -f -a "first\t'Take the oldest snapshot\'s value'
last\t'Take the newest snapshot\'s value'
max\t'Element-wise maximum'
sum\t'Element-wise sum (an error if it overflows the dtype)'
error\t'Refuse integer tensors'"
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l dtype -d 'Output dtype of floating tensors: f32, f16, bf16 or f64 (default: as stored). The average is accumulated in f64 and rounded once' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -s o -l output -d 'Output checkpoint (safetensors). With sharding: a folder, or a name for the index. A folder (DIR/, or one that exists) is written as a model folder: model.safetensors (or shards and their index) and the first input\'s config.json when it is a model folder' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l shard-size -d 'Write shards of at most this size plus an index, e.g. 2GB or 500MB (default: shard when the input was sharded, at 5GB)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l recal-bn -d 'Recompute the BatchNorm statistics of the averaged weights over the images in DIR (precise BN, as `ckpt recal-bn`) before writing; the data options below apply' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l estimator -d 'Estimator for --recal-bn (see `ckpt recal-bn --help`)' -r -f -a "population\t'fvcore\'s precise BN: statistics of all elements seen, weighted by count'
torch\t'torch.optim.swa_utils.update_bn: mean of batch means and of unbiased batch variances'"
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l arch -d 'Architecture, instead of recognising it from the tensors: a family (resnet, mobilenet_v2, efficientnet), a torchvision name (resnet50, efficientnet_b0, ...) or a timm name (regnety_004, tf_efficientnetv2_s, tf_mobilenetv3, ...: a tf_ port\'s padding and BN eps come only from its name)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l size -d 'Side of the square images fed to the model (default: 224, or a model folder\'s input_size)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l crop-pct -d 'Eval transform: resize to floor(S / P), then crop S x S from the centre (sweep-res takes a list: P1,P2,...) (default: 0.875, or a model folder\'s crop_pct)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l interpolation -d 'Resampling filter, antialiased as PIL\'s when downscaling (default: bilinear, or a model folder\'s interpolation)' -r -f -a "bilinear\t'PIL\'s BILINEAR (triangle filter, antialiased): torchvision\'s default'
bicubic\t'PIL\'s BICUBIC (Keys cubic, a = -0.5, antialiased): timm\'s usual choice'"
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l crop-mode -d 'Eval transform: center keeps the aspect ratio (shorter side to floor(S / P)), squash resizes both sides to floor(S / P); timm\'s crop modes (default: center, or a model folder\'s crop_mode)' -r -f -a "center\t'Resize the shorter side to size / crop_pct keeping the aspect ratio, then crop the centre'
squash\t'Resize both sides to size / crop_pct (aspect ratio not kept), then crop the centre'"
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l mean -d 'Per-channel means subtracted after scaling to [0, 1] (default: ImageNet\'s, or a model folder\'s mean)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l std -d 'Per-channel standard deviations divided by (default: ImageNet\'s, or a model folder\'s std)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l transform -d 'eval: resize, centre crop (--crop-pct, --crop-mode); train: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, seeded by --seed per image' -r -f -a "eval\t'Resize and centre crop (deterministic)'
train\t'Random resized crop and flip (seeded)'"
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l seed -d 'Seed of --max-images\' subset and of the train transform' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l max-image-pixels -d 'Refuse images whose header claims more than N pixels (decompression bombs), before decoding them; the default is PIL\'s limit (2 x Image.MAX_IMAGE_PIXELS); `none` for no limit' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l shard -d 'Recalibrate over only every n-th batch of DIR, starting at the i-th (0-based): the batches one of n machines would see' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l max-images -d 'Read at most N images: a random subset (seeded by --seed) when the folder has more, kept in folder order' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l batch-size -d 'Images per batch' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l device -d 'Device for forward passes: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present, else the CPU)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l threads -d 'Worker threads (default: one per core)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l kernels -d 'Kernels of the forward passes on the CPU: fast (ckpt\'s own) or candle (candle\'s ops, the path CUDA takes; for comparisons)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l no-sort -d 'Keep the order given instead of sorting by file name'
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l keep-prefix -d 'Keep the names as stored: wrapper prefixes (module. of DDP and AveragedModel, whose n_averaged then stays a tensor; _orig_mod. of torch.compile; a Lightning module\'s attribute) are otherwise removed when every key carries them, and commands that run the model also remove a prefix that makes the names fit an architecture'
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l per-step -d 'Use the step numbers in the file names: a gap of g steps decays by B^g, as if the snapshot\'s weights had been seen at each of those g steps'
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l warmup -d 'timm ModelEmaV3\'s warmup: the decay at step s is min(B, 1 - (1 + (s - 1) / gamma)^-power) with gamma 1 and power 2/3 (s: the file\'s step number with --per-step, else its position)'
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l allow-missing -d 'Average a tensor over the snapshots that have it (weights renormalised) instead of refusing snapshots with different tensors'
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l allow-nonfinite -d 'Average NaN and infinite values instead of refusing them'
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l force -d 'Replace an existing output (atomically)'
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l skip-bad -d 'Skip images that cannot be read or decoded (counted in the summary) instead of stopping'
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -l exif-transpose -d 'Rotate and flip images by their EXIF orientation (torchvision\'s loader ignores it)'
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -s q -l quiet -d 'Print results, warnings and errors only: no notes, no progress bars'
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ckpt -n "__fish_ckpt_using_subcommand ema" -s V -l version -d 'Print version'
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l arch -d 'Architecture, instead of recognising it from the tensors: a family (resnet, mobilenet_v2, efficientnet), a torchvision name (resnet50, efficientnet_b0, ...) or a timm name (regnety_004, tf_efficientnetv2_s, tf_mobilenetv3, ...: a tf_ port\'s padding and BN eps come only from its name)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l key -d 'Key of the state dict inside a torch.save training checkpoint (nested keys as a.b). Default: the first of state_dict_ema, model_ema, state_dict, model, module that is present' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l strip-prefix -d 'Also remove this prefix from every key (every key must carry it), e.g. model' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l input -d 'File holding the input batch as tensor `input` (see --input-key)' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l data -d 'Folder of images instead (eval transform, see the data options); also writes `labels` for an ImageFolder (the model\'s classes: see --class-map) and records the image paths and the transform in the metadata (what `ckpt distill --targets` reads)' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l size -d 'Side of the square images fed to the model (default: 224, or a model folder\'s input_size)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l crop-pct -d 'Eval transform: resize to floor(S / P), then crop S x S from the centre (sweep-res takes a list: P1,P2,...) (default: 0.875, or a model folder\'s crop_pct)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l interpolation -d 'Resampling filter, antialiased as PIL\'s when downscaling (default: bilinear, or a model folder\'s interpolation)' -r -f -a "bilinear\t'PIL\'s BILINEAR (triangle filter, antialiased): torchvision\'s default'
bicubic\t'PIL\'s BICUBIC (Keys cubic, a = -0.5, antialiased): timm\'s usual choice'"
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l crop-mode -d 'Eval transform: center keeps the aspect ratio (shorter side to floor(S / P)), squash resizes both sides to floor(S / P); timm\'s crop modes (default: center, or a model folder\'s crop_mode)' -r -f -a "center\t'Resize the shorter side to size / crop_pct keeping the aspect ratio, then crop the centre'
squash\t'Resize both sides to size / crop_pct (aspect ratio not kept), then crop the centre'"
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l mean -d 'Per-channel means subtracted after scaling to [0, 1] (default: ImageNet\'s, or a model folder\'s mean)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l std -d 'Per-channel standard deviations divided by (default: ImageNet\'s, or a model folder\'s std)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l transform -d 'eval: resize, centre crop (--crop-pct, --crop-mode); train: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, seeded by --seed per image' -r -f -a "eval\t'Resize and centre crop (deterministic)'
train\t'Random resized crop and flip (seeded)'"
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l max-images -d 'Read at most N images: a random subset (seeded by --seed) when the folder has more, kept in folder order' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l seed -d 'Seed of --max-images\' subset and of the train transform' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l shard -d 'Read only every n-th image starting at the i-th (0-based), after --max-images: n machines with shards 0/n .. n-1/n split one pass over the images' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l batch-size -d 'Images per batch' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l max-image-pixels -d 'Refuse images whose header claims more than N pixels (decompression bombs), before decoding them; the default is PIL\'s limit (2 x Image.MAX_IMAGE_PIXELS); `none` for no limit' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l class-map -d 'Class map in timm\'s format: one class folder name per line, the line number (from 0) being the model\'s class index; images of folders it does not name are left out (with a warning). Without it: the ImageNet-1k synset order when the model has 1000 classes and every class folder is a WordNet id (n01440764, ...), else the folders\' sorted order' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l input-key -d 'Name of the input tensor' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -s o -l output -d 'Output file (safetensors)' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l top-k -d 'Store only the K largest logits per image and their class indices' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l device -d 'Device for forward passes: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present, else the CPU)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l threads -d 'Worker threads (default: one per core)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l kernels -d 'Kernels of the forward passes on the CPU: fast (ckpt\'s own) or candle (candle\'s ops, the path CUDA takes; for comparisons)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l keep-prefix -d 'Keep the names as stored: wrapper prefixes (module. of DDP and AveragedModel, whose n_averaged then stays a tensor; _orig_mod. of torch.compile; a Lightning module\'s attribute) are otherwise removed when every key carries them, and commands that run the model also remove a prefix that makes the names fit an architecture'
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l skip-bad -d 'Skip images that cannot be read or decoded (counted in the summary) instead of stopping'
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l exif-transpose -d 'Rotate and flip images by their EXIF orientation (torchvision\'s loader ignores it)'
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l strict-labels -d 'Refuse, instead of warning, when the class folders cannot be the model\'s classes (a different count without a map, or folders the map does not name)'
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -l force -d 'Replace an existing output (atomically)'
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -s q -l quiet -d 'Print results, warnings and errors only: no notes, no progress bars'
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ckpt -n "__fish_ckpt_using_subcommand logits" -s V -l version -d 'Print version'
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l arch -d 'Architecture, instead of recognising it from the tensors: a family (resnet, mobilenet_v2, efficientnet), a torchvision name (resnet50, efficientnet_b0, ...) or a timm name (regnety_004, tf_efficientnetv2_s, tf_mobilenetv3, ...: a tf_ port\'s padding and BN eps come only from its name)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l key -d 'Key of the state dict inside a torch.save training checkpoint (nested keys as a.b). Default: the first of state_dict_ema, model_ema, state_dict, model, module that is present' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l strip-prefix -d 'Also remove this prefix from every key (every key must carry it), e.g. model' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l data -d 'Folder of images: ImageFolder layout (one sub-folder per class, in sorted order: class indices as torchvision\'s, unless --class-map) or flat (unlabelled). Files ending in .jpg, .jpeg, .png, .webp or .bmp are read; hidden and other files are skipped' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l size -d 'Side of the square images fed to the model (default: 224, or a model folder\'s input_size)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l crop-pct -d 'Eval transform: resize to floor(S / P), then crop S x S from the centre (sweep-res takes a list: P1,P2,...) (default: 0.875, or a model folder\'s crop_pct)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l interpolation -d 'Resampling filter, antialiased as PIL\'s when downscaling (default: bilinear, or a model folder\'s interpolation)' -r -f -a "bilinear\t'PIL\'s BILINEAR (triangle filter, antialiased): torchvision\'s default'
bicubic\t'PIL\'s BICUBIC (Keys cubic, a = -0.5, antialiased): timm\'s usual choice'"
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l crop-mode -d 'Eval transform: center keeps the aspect ratio (shorter side to floor(S / P)), squash resizes both sides to floor(S / P); timm\'s crop modes (default: center, or a model folder\'s crop_mode)' -r -f -a "center\t'Resize the shorter side to size / crop_pct keeping the aspect ratio, then crop the centre'
squash\t'Resize both sides to size / crop_pct (aspect ratio not kept), then crop the centre'"
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l mean -d 'Per-channel means subtracted after scaling to [0, 1] (default: ImageNet\'s, or a model folder\'s mean)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l std -d 'Per-channel standard deviations divided by (default: ImageNet\'s, or a model folder\'s std)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l transform -d 'eval: resize, centre crop (--crop-pct, --crop-mode); train: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, seeded by --seed per image' -r -f -a "eval\t'Resize and centre crop (deterministic)'
train\t'Random resized crop and flip (seeded)'"
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l max-images -d 'Read at most N images: a random subset (seeded by --seed) when the folder has more, kept in folder order' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l seed -d 'Seed of --max-images\' subset and of the train transform' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l shard -d 'Read only every n-th image starting at the i-th (0-based), after --max-images: n machines with shards 0/n .. n-1/n split one pass over the images' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l batch-size -d 'Images per batch' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l max-image-pixels -d 'Refuse images whose header claims more than N pixels (decompression bombs), before decoding them; the default is PIL\'s limit (2 x Image.MAX_IMAGE_PIXELS); `none` for no limit' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l class-map -d 'Class map in timm\'s format: one class folder name per line, the line number (from 0) being the model\'s class index; images of folders it does not name are left out (with a warning). Without it: the ImageNet-1k synset order when the model has 1000 classes and every class folder is a WordNet id (n01440764, ...), else the folders\' sorted order' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l teacher -d 'A teacher to compare with (repeat for an ensemble: logits averaged): adds the KD loss (KLSoftLoss, as distill\'s) and the top-1 agreement between the model and the teacher' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l temperature -d 'Softening temperature T of the KD loss (with --teacher)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l json -d 'Print the result as JSON instead of text; --json=FILE writes it to FILE instead' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l device -d 'Device for forward passes: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present, else the CPU)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l threads -d 'Worker threads (default: one per core)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l kernels -d 'Kernels of the forward passes on the CPU: fast (ckpt\'s own) or candle (candle\'s ops, the path CUDA takes; for comparisons)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l keep-prefix -d 'Keep the names as stored: wrapper prefixes (module. of DDP and AveragedModel, whose n_averaged then stays a tensor; _orig_mod. of torch.compile; a Lightning module\'s attribute) are otherwise removed when every key carries them, and commands that run the model also remove a prefix that makes the names fit an architecture'
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l skip-bad -d 'Skip images that cannot be read or decoded (counted in the summary) instead of stopping'
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l exif-transpose -d 'Rotate and flip images by their EXIF orientation (torchvision\'s loader ignores it)'
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l strict-labels -d 'Refuse, instead of warning, when the class folders cannot be the model\'s classes (a different count without a map, or folders the map does not name)'
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -l force -d 'Replace an existing --json=FILE'
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -s q -l quiet -d 'Print results, warnings and errors only: no notes, no progress bars'
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ckpt -n "__fish_ckpt_using_subcommand eval" -s V -l version -d 'Print version'
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l arch -d 'Architecture, instead of recognising it from the tensors: a family (resnet, mobilenet_v2, efficientnet), a torchvision name (resnet50, efficientnet_b0, ...) or a timm name (regnety_004, tf_efficientnetv2_s, tf_mobilenetv3, ...: a tf_ port\'s padding and BN eps come only from its name)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l key -d 'Key of the state dict inside a torch.save training checkpoint (nested keys as a.b). Default: the first of state_dict_ema, model_ema, state_dict, model, module that is present' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l strip-prefix -d 'Also remove this prefix from every key (every key must carry it), e.g. model' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l data -d 'Folder of (training) images; see the data options' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l size -d 'Side of the square images fed to the model (default: 224, or a model folder\'s input_size)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l crop-pct -d 'Eval transform: resize to floor(S / P), then crop S x S from the centre (sweep-res takes a list: P1,P2,...) (default: 0.875, or a model folder\'s crop_pct)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l interpolation -d 'Resampling filter, antialiased as PIL\'s when downscaling (default: bilinear, or a model folder\'s interpolation)' -r -f -a "bilinear\t'PIL\'s BILINEAR (triangle filter, antialiased): torchvision\'s default'
bicubic\t'PIL\'s BICUBIC (Keys cubic, a = -0.5, antialiased): timm\'s usual choice'"
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l crop-mode -d 'Eval transform: center keeps the aspect ratio (shorter side to floor(S / P)), squash resizes both sides to floor(S / P); timm\'s crop modes (default: center, or a model folder\'s crop_mode)' -r -f -a "center\t'Resize the shorter side to size / crop_pct keeping the aspect ratio, then crop the centre'
squash\t'Resize both sides to size / crop_pct (aspect ratio not kept), then crop the centre'"
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l mean -d 'Per-channel means subtracted after scaling to [0, 1] (default: ImageNet\'s, or a model folder\'s mean)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l std -d 'Per-channel standard deviations divided by (default: ImageNet\'s, or a model folder\'s std)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l transform -d 'eval: resize, centre crop (--crop-pct, --crop-mode); train: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, seeded by --seed per image' -r -f -a "eval\t'Resize and centre crop (deterministic)'
train\t'Random resized crop and flip (seeded)'"
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l seed -d 'Seed of --max-images\' subset and of the train transform' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l max-image-pixels -d 'Refuse images whose header claims more than N pixels (decompression bombs), before decoding them; the default is PIL\'s limit (2 x Image.MAX_IMAGE_PIXELS); `none` for no limit' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l estimator -d 'How running statistics are estimated from the batches (default: population). A stats part records it; with --merge the parts\' is used, and a different one is refused' -r -f -a "population\t'fvcore\'s precise BN: statistics of all elements seen, weighted by count'
torch\t'torch.optim.swa_utils.update_bn: mean of batch means and of unbiased batch variances'"
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l stats-out -d 'Write the mergeable per-layer sums (f64) to this file instead of a checkpoint' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l merge -d 'Combine --stats-out files of shards instead of reading images' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -s o -l output -d 'Output checkpoint (or, with --stats-out, the statistics file); DIR/ writes a model folder: model.safetensors and the model folder\'s config.json' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l json -d 'Print the result as JSON instead of text; --json=FILE writes it to FILE instead' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l max-images -d 'Read at most N images: a random subset (seeded by --seed) when the folder has more, kept in folder order' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l batch-size -d 'Images per batch' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l shard -d 'Read only every n-th batch of the pass, starting at the i-th (0-based): n machines with shards 0/n .. n-1/n and --stats-out split one pass, and --merge equals it' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l device -d 'Device for forward passes: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present, else the CPU)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l threads -d 'Worker threads (default: one per core)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l kernels -d 'Kernels of the forward passes on the CPU: fast (ckpt\'s own) or candle (candle\'s ops, the path CUDA takes; for comparisons)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l keep-prefix -d 'Keep the names as stored: wrapper prefixes (module. of DDP and AveragedModel, whose n_averaged then stays a tensor; _orig_mod. of torch.compile; a Lightning module\'s attribute) are otherwise removed when every key carries them, and commands that run the model also remove a prefix that makes the names fit an architecture'
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l skip-bad -d 'Skip images that cannot be read or decoded (counted in the summary) instead of stopping'
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l exif-transpose -d 'Rotate and flip images by their EXIF orientation (torchvision\'s loader ignores it)'
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -l force -d 'Replace an existing output'
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -s q -l quiet -d 'Print results, warnings and errors only: no notes, no progress bars'
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ckpt -n "__fish_ckpt_using_subcommand recal-bn" -s V -l version -d 'Print version'
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l data -d 'Folder of labelled images (ImageFolder)' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l crop-pct -d 'Eval transform: resize to floor(S / P), then crop S x S from the centre (sweep-res takes a list: P1,P2,...) (default: 0.875, or a model folder\'s crop_pct)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l interpolation -d 'Resampling filter, antialiased as PIL\'s when downscaling (default: bilinear, or a model folder\'s interpolation)' -r -f -a "bilinear\t'PIL\'s BILINEAR (triangle filter, antialiased): torchvision\'s default'
bicubic\t'PIL\'s BICUBIC (Keys cubic, a = -0.5, antialiased): timm\'s usual choice'"
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l crop-mode -d 'Eval transform: center keeps the aspect ratio (shorter side to floor(S / P)), squash resizes both sides to floor(S / P); timm\'s crop modes (default: center, or a model folder\'s crop_mode)' -r -f -a "center\t'Resize the shorter side to size / crop_pct keeping the aspect ratio, then crop the centre'
squash\t'Resize both sides to size / crop_pct (aspect ratio not kept), then crop the centre'"
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l mean -d 'Per-channel means subtracted after scaling to [0, 1] (default: ImageNet\'s, or a model folder\'s mean)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l std -d 'Per-channel standard deviations divided by (default: ImageNet\'s, or a model folder\'s std)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l transform -d 'eval: resize, centre crop (--crop-pct, --crop-mode); train: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, seeded by --seed per image' -r -f -a "eval\t'Resize and centre crop (deterministic)'
train\t'Random resized crop and flip (seeded)'"
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l max-images -d 'Read at most N images: a random subset (seeded by --seed) when the folder has more, kept in folder order' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l seed -d 'Seed of --max-images\' subset and of the train transform' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l max-image-pixels -d 'Refuse images whose header claims more than N pixels (decompression bombs), before decoding them; the default is PIL\'s limit (2 x Image.MAX_IMAGE_PIXELS); `none` for no limit' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l class-map -d 'Class map in timm\'s format: one class folder name per line, the line number (from 0) being the model\'s class index; images of folders it does not name are left out (with a warning). Without it: the ImageNet-1k synset order when the model has 1000 classes and every class folder is a WordNet id (n01440764, ...), else the folders\' sorted order' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l sizes -d 'Test sizes (default: multiples of 32 from 0.75x to 1.5x of --train-size)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l recal-bn -d 'Re-estimate BN statistics at each size over the images in DIR before evaluating it' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l estimator -d 'Estimator for --recal-bn (see `ckpt recal-bn --help`)' -r -f -a "population\t'fvcore\'s precise BN: statistics of all elements seen, weighted by count'
torch\t'torch.optim.swa_utils.update_bn: mean of batch means and of unbiased batch variances'"
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l fixres -d 'Fine-tune each model at each size over the labelled images in TRAIN before evaluating it (FixRes, as `ckpt fixres`; after --recal-bn when both are given), with the training options below' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l epochs -d 'Passes over the training images' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l opt -d 'Optimiser: torch.optim.SGD, or torch.optim.AdamW (betas 0.9, 0.999, eps 1e-8; its decoupled weight decay is --weight-decay)' -r -f -a "sgd\t'torch.optim.SGD: --momentum, --nesterov, --weight-decay'
adamw\t'torch.optim.AdamW: betas (0.9, 0.999), eps 1e-8, decoupled --weight-decay'"
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l lr -d 'Learning rate (the seed\'s 1e-3)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l momentum -d 'SGD momentum' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l weight-decay -d 'Weight decay of the trained parameters (SGD: added to the gradient, as torch.optim.SGD; AdamW: decoupled, as torch.optim.AdamW)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l lr-schedule -d 'Learning-rate schedule over the steps' -r -f -a "constant\t'The same learning rate every step'
cosine\t'Half a cosine from --lr to 0 over the steps (after any warm-up)'"
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l warmup-steps -d 'Steps of linear warm-up to --lr before the schedule' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l bn-momentum -d 'Momentum of the trained BN\'s running statistics (default: the family\'s, PyTorch\'s 0.1)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l cache-mb -d 'Keep the frozen backbone\'s output in memory after the first epoch when all of it fits in this many MiB, so that later epochs neither decode images nor rerun the backbone (default: a quarter of the machine\'s memory); otherwise it is recomputed every epoch' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l save-best -d 'Write the checkpoint of the best size: recalibrated (--recal-bn) and fine-tuned (--fixres) there; needs one of them and one MODEL' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l csv -d 'Write the results as CSV in the column layout of timm\'s results-imagenet.csv' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l json -d 'Print the result as JSON instead of text; --json=FILE writes it to FILE instead' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l plot -d 'Plot top-1 against test size, one line per model and crop_pct (.png or .svg)' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l arch -d 'Architecture, instead of recognising it from the tensors: a family (resnet, mobilenet_v2, efficientnet), a torchvision name (resnet50, efficientnet_b0, ...) or a timm name (regnety_004, tf_efficientnetv2_s, tf_mobilenetv3, ...: a tf_ port\'s padding and BN eps come only from its name)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l key -d 'Key of the state dict inside a torch.save training checkpoint (nested keys as a.b). Default: the first of state_dict_ema, model_ema, state_dict, model, module that is present' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l strip-prefix -d 'Also remove this prefix from every key (every key must carry it), e.g. model' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l train-size -d 'Training image size: the default sizes are multiples of 32 from 0.75x to 1.5x of it (and a model folder\'s test_input_size), and deltas are against it (default: 224, or a model folder\'s input_size)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l batch-size -d 'Images per batch' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l shard -d 'Evaluate only every n-th image of --data starting at the i-th (0-based), after --max-images; the --recal-bn passes read all of DIR' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l device -d 'Device for forward passes: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present, else the CPU)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l threads -d 'Worker threads (default: one per core)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l kernels -d 'Kernels of the forward passes on the CPU: fast (ckpt\'s own) or candle (candle\'s ops, the path CUDA takes; for comparisons)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l skip-bad -d 'Skip images that cannot be read or decoded (counted in the summary) instead of stopping'
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l exif-transpose -d 'Rotate and flip images by their EXIF orientation (torchvision\'s loader ignores it)'
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l strict-labels -d 'Refuse, instead of warning, when the class folders cannot be the model\'s classes (a different count without a map, or folders the map does not name)'
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l nesterov -d 'Nesterov momentum (SGD)'
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l no-shuffle -d 'Keep the folder\'s order every epoch instead of a shuffle seeded by --seed'
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l train-bn-affine -d 'Also train the last BN\'s weight and bias (the FixRes paper\'s variant)'
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l force -d 'Replace existing output files'
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -l keep-prefix -d 'Keep the names as stored: wrapper prefixes (module. of DDP and AveragedModel, whose n_averaged then stays a tensor; _orig_mod. of torch.compile; a Lightning module\'s attribute) are otherwise removed when every key carries them, and commands that run the model also remove a prefix that makes the names fit an architecture'
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -s q -l quiet -d 'Print results, warnings and errors only: no notes, no progress bars'
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ckpt -n "__fish_ckpt_using_subcommand sweep-res" -s V -l version -d 'Print version'
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l arch -d 'Architecture, instead of recognising it from the tensors: a family (resnet, mobilenet_v2, efficientnet), a torchvision name (resnet50, efficientnet_b0, ...) or a timm name (regnety_004, tf_efficientnetv2_s, tf_mobilenetv3, ...: a tf_ port\'s padding and BN eps come only from its name)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l key -d 'Key of the state dict inside a torch.save training checkpoint (nested keys as a.b). Default: the first of state_dict_ema, model_ema, state_dict, model, module that is present' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l strip-prefix -d 'Also remove this prefix from every key (every key must carry it), e.g. model' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l data -d 'Folder of images: ImageFolder layout (one sub-folder per class, in sorted order: class indices as torchvision\'s, unless --class-map) or flat (unlabelled). Files ending in .jpg, .jpeg, .png, .webp or .bmp are read; hidden and other files are skipped' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l crop-pct -d 'Eval transform: resize to floor(S / P), then crop S x S from the centre (sweep-res takes a list: P1,P2,...) (default: 0.875, or a model folder\'s crop_pct)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l interpolation -d 'Resampling filter, antialiased as PIL\'s when downscaling (default: bilinear, or a model folder\'s interpolation)' -r -f -a "bilinear\t'PIL\'s BILINEAR (triangle filter, antialiased): torchvision\'s default'
bicubic\t'PIL\'s BICUBIC (Keys cubic, a = -0.5, antialiased): timm\'s usual choice'"
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l crop-mode -d 'Eval transform: center keeps the aspect ratio (shorter side to floor(S / P)), squash resizes both sides to floor(S / P); timm\'s crop modes (default: center, or a model folder\'s crop_mode)' -r -f -a "center\t'Resize the shorter side to size / crop_pct keeping the aspect ratio, then crop the centre'
squash\t'Resize both sides to size / crop_pct (aspect ratio not kept), then crop the centre'"
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l mean -d 'Per-channel means subtracted after scaling to [0, 1] (default: ImageNet\'s, or a model folder\'s mean)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l std -d 'Per-channel standard deviations divided by (default: ImageNet\'s, or a model folder\'s std)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l transform -d 'eval: resize, centre crop (--crop-pct, --crop-mode); train: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, seeded by --seed per image' -r -f -a "eval\t'Resize and centre crop (deterministic)'
train\t'Random resized crop and flip (seeded)'"
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l seed -d 'Seed of --max-images\' subset and of the train transform' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l shard -d 'Read only every n-th image starting at the i-th (0-based), after --max-images: n machines with shards 0/n .. n-1/n split one pass over the images' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l max-image-pixels -d 'Refuse images whose header claims more than N pixels (decompression bombs), before decoding them; the default is PIL\'s limit (2 x Image.MAX_IMAGE_PIXELS); `none` for no limit' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l class-map -d 'Class map in timm\'s format: one class folder name per line, the line number (from 0) being the model\'s class index; images of folders it does not name are left out (with a warning). Without it: the ImageNet-1k synset order when the model has 1000 classes and every class folder is a WordNet id (n01440764, ...), else the folders\' sorted order' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l epochs -d 'Passes over the training images' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l opt -d 'Optimiser: torch.optim.SGD, or torch.optim.AdamW (betas 0.9, 0.999, eps 1e-8; its decoupled weight decay is --weight-decay)' -r -f -a "sgd\t'torch.optim.SGD: --momentum, --nesterov, --weight-decay'
adamw\t'torch.optim.AdamW: betas (0.9, 0.999), eps 1e-8, decoupled --weight-decay'"
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l lr -d 'Learning rate (the seed\'s 1e-3)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l momentum -d 'SGD momentum' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l weight-decay -d 'Weight decay of the trained parameters (SGD: added to the gradient, as torch.optim.SGD; AdamW: decoupled, as torch.optim.AdamW)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l lr-schedule -d 'Learning-rate schedule over the steps' -r -f -a "constant\t'The same learning rate every step'
cosine\t'Half a cosine from --lr to 0 over the steps (after any warm-up)'"
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l warmup-steps -d 'Steps of linear warm-up to --lr before the schedule' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l bn-momentum -d 'Momentum of the trained BN\'s running statistics (default: the family\'s, PyTorch\'s 0.1)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l cache-mb -d 'Keep the frozen backbone\'s output in memory after the first epoch when all of it fits in this many MiB, so that later epochs neither decode images nor rerun the backbone (default: a quarter of the machine\'s memory); otherwise it is recomputed every epoch' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l recal-bn -d 'Re-estimate every BN layer\'s statistics at --size over DIR before fine-tuning (usually the training folder; the data options apply)' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l estimator -d 'Estimator for --recal-bn (see `ckpt recal-bn --help`)' -r -f -a "population\t'fvcore\'s precise BN: statistics of all elements seen, weighted by count'
torch\t'torch.optim.swa_utils.update_bn: mean of batch means and of unbiased batch variances'"
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l val -d 'Labelled folder to report top-1/top-5 at --size before, after --recal-bn, and after the fine-tune' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l json -d 'Print the result as JSON instead of text; --json=FILE writes it to FILE instead' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -s o -l output -d 'Output file (safetensors); DIR/ writes a model folder: model.safetensors and the model\'s config.json when it is a model folder' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l size -d 'Test size to fine-tune at (side of the square images)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l batch-size -d 'Images per batch' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l max-images -d 'Fine-tune on at most N images of --data: a random subset (seeded by --seed) when the folder has more, kept in folder order' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l device -d 'Device for forward passes: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present, else the CPU)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l threads -d 'Worker threads (default: one per core)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l kernels -d 'Kernels of the forward passes on the CPU: fast (ckpt\'s own) or candle (candle\'s ops, the path CUDA takes; for comparisons)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l keep-prefix -d 'Keep the names as stored: wrapper prefixes (module. of DDP and AveragedModel, whose n_averaged then stays a tensor; _orig_mod. of torch.compile; a Lightning module\'s attribute) are otherwise removed when every key carries them, and commands that run the model also remove a prefix that makes the names fit an architecture'
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l skip-bad -d 'Skip images that cannot be read or decoded (counted in the summary) instead of stopping'
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l exif-transpose -d 'Rotate and flip images by their EXIF orientation (torchvision\'s loader ignores it)'
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l strict-labels -d 'Refuse, instead of warning, when the class folders cannot be the model\'s classes (a different count without a map, or folders the map does not name)'
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l force -d 'Replace an existing output (atomically)'
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l nesterov -d 'Nesterov momentum (SGD)'
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l no-shuffle -d 'Keep the folder\'s order every epoch instead of a shuffle seeded by --seed'
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -l train-bn-affine -d 'Also train the last BN\'s weight and bias (the FixRes paper\'s variant)'
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -s q -l quiet -d 'Print results, warnings and errors only: no notes, no progress bars'
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ckpt -n "__fish_ckpt_using_subcommand fixres" -s V -l version -d 'Print version'
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l last -d 'Keep only the N newest snapshots (applied after --every)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l every -d 'Keep every K-th snapshot, counted back from the newest (which is always kept)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l key -d 'Key of the state dict inside a torch.save training checkpoint (nested keys as a.b). Default: the first of state_dict_ema, model_ema, state_dict, model, module that is present' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l strip-prefix -d 'Also remove this prefix from every key (every key must carry it), e.g. model' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l data -d 'Labelled folder (ImageFolder) the candidates and soups are judged on: held-out images' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l size -d 'Side of the square images fed to the model (default: 224, or a model folder\'s input_size)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l crop-pct -d 'Eval transform: resize to floor(S / P), then crop S x S from the centre (sweep-res takes a list: P1,P2,...) (default: 0.875, or a model folder\'s crop_pct)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l interpolation -d 'Resampling filter, antialiased as PIL\'s when downscaling (default: bilinear, or a model folder\'s interpolation)' -r -f -a "bilinear\t'PIL\'s BILINEAR (triangle filter, antialiased): torchvision\'s default'
bicubic\t'PIL\'s BICUBIC (Keys cubic, a = -0.5, antialiased): timm\'s usual choice'"
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l crop-mode -d 'Eval transform: center keeps the aspect ratio (shorter side to floor(S / P)), squash resizes both sides to floor(S / P); timm\'s crop modes (default: center, or a model folder\'s crop_mode)' -r -f -a "center\t'Resize the shorter side to size / crop_pct keeping the aspect ratio, then crop the centre'
squash\t'Resize both sides to size / crop_pct (aspect ratio not kept), then crop the centre'"
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l mean -d 'Per-channel means subtracted after scaling to [0, 1] (default: ImageNet\'s, or a model folder\'s mean)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l std -d 'Per-channel standard deviations divided by (default: ImageNet\'s, or a model folder\'s std)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l transform -d 'eval: resize, centre crop (--crop-pct, --crop-mode); train: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, seeded by --seed per image' -r -f -a "eval\t'Resize and centre crop (deterministic)'
train\t'Random resized crop and flip (seeded)'"
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l max-images -d 'Read at most N images: a random subset (seeded by --seed) when the folder has more, kept in folder order' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l seed -d 'Seed of --max-images\' subset and of the train transform' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l shard -d 'Read only every n-th image starting at the i-th (0-based), after --max-images: n machines with shards 0/n .. n-1/n split one pass over the images' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l max-image-pixels -d 'Refuse images whose header claims more than N pixels (decompression bombs), before decoding them; the default is PIL\'s limit (2 x Image.MAX_IMAGE_PIXELS); `none` for no limit' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l class-map -d 'Class map in timm\'s format: one class folder name per line, the line number (from 0) being the model\'s class index; images of folders it does not name are left out (with a warning). Without it: the ImageNet-1k synset order when the model has 1000 classes and every class folder is a WordNet id (n01440764, ...), else the folders\' sorted order' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l method -d 'How the ingredients are chosen' -r -f -a "greedy\t'Greedy soup: add candidates in rank order while the soup does not get worse'
uniform\t'The uniform average of every candidate'
best\t'The single best candidate'"
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l metric -d 'What ranks the candidates and decides whether a soup got worse' -r -f -a "top1\t'Top-1 accuracy (ties: lower loss)'
loss\t'Mean cross-entropy'"
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l recal-bn -d 'Recompute the BatchNorm statistics of every candidate and soup over the images in DIR (precise BN, as recal-bn; usually the training folder) before judging it; strongly suggested for BN models. The data options apply, but --max-images (see --recal-max-images)' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l estimator -d 'Estimator for --recal-bn (see `ckpt recal-bn --help`)' -r -f -a "population\t'fvcore\'s precise BN: statistics of all elements seen, weighted by count'
torch\t'torch.optim.swa_utils.update_bn: mean of batch means and of unbiased batch variances'"
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l recal-max-images -d 'Recalibrate over at most N images of DIR: a random subset (seeded by --seed) when it has more, kept in folder order' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l cache-mb -d 'Memory for decoded images kept between evaluations, in MiB (default: a quarter of RAM); folders that do not fit are decoded again for every evaluation' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l int -d 'Integer tensors (num_batches_tracked) are never averaged: take the newest snapshot\'s value (last), the oldest\'s (first), the element-wise max or sum, or refuse them (error)' -r -f -a "first\t'Take the oldest snapshot\'s value'
last\t'Take the newest snapshot\'s value'
max\t'Element-wise maximum'
sum\t'Element-wise sum (an error if it overflows the dtype)'
error\t'Refuse integer tensors'"
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l dtype -d 'Output dtype of floating tensors: f32, f16, bf16 or f64 (default: as stored). The average is accumulated in f64 and rounded once' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -s o -l output -d 'Output checkpoint (safetensors). With sharding: a folder, or a name for the index. A folder (DIR/, or one that exists) is written as a model folder: model.safetensors (or shards and their index) and the first input\'s config.json when it is a model folder' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l shard-size -d 'Write shards of at most this size plus an index, e.g. 2GB or 500MB (default: shard when the input was sharded, at 5GB)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l json -d 'Print the result as JSON instead of text; --json=FILE writes it to FILE instead' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l arch -d 'Architecture, instead of recognising it from the tensors: a family (resnet, mobilenet_v2, efficientnet), a torchvision name (resnet50, efficientnet_b0, ...) or a timm name (regnety_004, tf_efficientnetv2_s, tf_mobilenetv3, ...: a tf_ port\'s padding and BN eps come only from its name)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l batch-size -d 'Images per batch' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l device -d 'Device for forward passes: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present, else the CPU)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l threads -d 'Worker threads (default: one per core)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l kernels -d 'Kernels of the forward passes on the CPU: fast (ckpt\'s own) or candle (candle\'s ops, the path CUDA takes; for comparisons)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l no-sort -d 'Keep the order given instead of sorting by file name'
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l keep-prefix -d 'Keep the names as stored: wrapper prefixes (module. of DDP and AveragedModel, whose n_averaged then stays a tensor; _orig_mod. of torch.compile; a Lightning module\'s attribute) are otherwise removed when every key carries them, and commands that run the model also remove a prefix that makes the names fit an architecture'
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l skip-bad -d 'Skip images that cannot be read or decoded (counted in the summary) instead of stopping'
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l exif-transpose -d 'Rotate and flip images by their EXIF orientation (torchvision\'s loader ignores it)'
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l strict-labels -d 'Refuse, instead of warning, when the class folders cannot be the model\'s classes (a different count without a map, or folders the map does not name)'
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l allow-missing -d 'Average a tensor over the snapshots that have it (weights renormalised) instead of refusing snapshots with different tensors'
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l allow-nonfinite -d 'Average NaN and infinite values instead of refusing them'
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -l force -d 'Replace an existing output (atomically)'
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -s q -l quiet -d 'Print results, warnings and errors only: no notes, no progress bars'
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ckpt -n "__fish_ckpt_using_subcommand soup" -s V -l version -d 'Print version'
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l arch -d 'Architecture, instead of recognising it from the tensors: a family (resnet, mobilenet_v2, efficientnet), a torchvision name (resnet50, efficientnet_b0, ...) or a timm name (regnety_004, tf_efficientnetv2_s, tf_mobilenetv3, ...: a tf_ port\'s padding and BN eps come only from its name)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l key -d 'Key of the state dict inside a torch.save training checkpoint (nested keys as a.b). Default: the first of state_dict_ema, model_ema, state_dict, model, module that is present' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l strip-prefix -d 'Also remove this prefix from every key (every key must carry it), e.g. model' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l teacher -d 'Teacher checkpoint, run on every batch; repeat for an ensemble (logits averaged). One of --teacher and --targets is needed' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l targets -d 'Offline teacher: the logits `ckpt logits TEACHER --data TRAIN` stored (dense or --top-k), looked up by image path; no teacher runs. Needs a deterministic transform (the default --transform becomes eval) and the data options FILE was made with' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l data -d 'Folder of images: ImageFolder layout (one sub-folder per class, in sorted order: class indices as torchvision\'s, unless --class-map) or flat (unlabelled). Files ending in .jpg, .jpeg, .png, .webp or .bmp are read; hidden and other files are skipped' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l size -d 'Side of the square images fed to the model (default: 224, or a model folder\'s input_size)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l crop-pct -d 'Eval transform: resize to floor(S / P), then crop S x S from the centre (sweep-res takes a list: P1,P2,...) (default: 0.875, or a model folder\'s crop_pct)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l interpolation -d 'Resampling filter, antialiased as PIL\'s when downscaling (default: bilinear, or a model folder\'s interpolation)' -r -f -a "bilinear\t'PIL\'s BILINEAR (triangle filter, antialiased): torchvision\'s default'
bicubic\t'PIL\'s BICUBIC (Keys cubic, a = -0.5, antialiased): timm\'s usual choice'"
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l crop-mode -d 'Eval transform: center keeps the aspect ratio (shorter side to floor(S / P)), squash resizes both sides to floor(S / P); timm\'s crop modes (default: center, or a model folder\'s crop_mode)' -r -f -a "center\t'Resize the shorter side to size / crop_pct keeping the aspect ratio, then crop the centre'
squash\t'Resize both sides to size / crop_pct (aspect ratio not kept), then crop the centre'"
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l mean -d 'Per-channel means subtracted after scaling to [0, 1] (default: ImageNet\'s, or a model folder\'s mean)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l std -d 'Per-channel standard deviations divided by (default: ImageNet\'s, or a model folder\'s std)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l seed -d 'Seed of --max-images\' subset and of the train transform' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l shard -d 'Read only every n-th image starting at the i-th (0-based), after --max-images: n machines with shards 0/n .. n-1/n split one pass over the images' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l max-image-pixels -d 'Refuse images whose header claims more than N pixels (decompression bombs), before decoding them; the default is PIL\'s limit (2 x Image.MAX_IMAGE_PIXELS); `none` for no limit' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l class-map -d 'Class map in timm\'s format: one class folder name per line, the line number (from 0) being the model\'s class index; images of folders it does not name are left out (with a warning). Without it: the ImageNet-1k synset order when the model has 1000 classes and every class folder is a WordNet id (n01440764, ...), else the folders\' sorted order' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l alpha -d 'Weight of the distillation loss: (1 - A) CE + A KD (default: CE + KD, the seed\'s sum); 1 needs no labels' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l temperature -d 'Softening temperature T of both softmaxes' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l epochs -d 'Passes over the training images' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l opt -d 'Optimiser: torch.optim.SGD, or torch.optim.AdamW (betas 0.9, 0.999, eps 1e-8; its decoupled weight decay is --weight-decay)' -r -f -a "sgd\t'torch.optim.SGD: --momentum, --nesterov, --weight-decay'
adamw\t'torch.optim.AdamW: betas (0.9, 0.999), eps 1e-8, decoupled --weight-decay'"
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l lr -d 'Learning rate' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l momentum -d 'SGD momentum' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l weight-decay -d 'Weight decay of the weights (SGD: added to the gradient, as torch.optim.SGD; AdamW: decoupled, as torch.optim.AdamW)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l schedule -d 'Learning-rate schedule over the steps' -r -f -a "constant\t'The same learning rate every step'
cosine\t'Half a cosine from --lr to 0 over the steps (after any warm-up)'"
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l warmup-epochs -d 'Epochs of linear warm-up to --lr before the schedule' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l save-every -d 'Save the run\'s state (student, optimiser buffers, steps) to OUT.resume every N epochs, atomically, so that --resume can continue it; removed once OUT is written' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l json -d 'Print the result as JSON instead of text; --json=FILE writes it to FILE instead' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -s o -l output -d 'Output file (safetensors); DIR/ writes a model folder: model.safetensors and the model\'s config.json when it is a model folder' -r -F
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l transform -d 'eval: resize, centre crop (--crop-pct, --crop-mode); train: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, seeded by --seed per image' -r -f -a "eval\t'Resize and centre crop (deterministic)'
train\t'Random resized crop and flip (seeded)'"
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l batch-size -d 'Images per batch' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l max-images -d 'Train on at most N images of --data: a random subset (seeded by --seed) when the folder has more, kept in folder order' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l device -d 'Device for forward passes: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present, else the CPU)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l threads -d 'Worker threads (default: one per core)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l kernels -d 'Kernels of the forward passes on the CPU: fast (ckpt\'s own) or candle (candle\'s ops, the path CUDA takes; for comparisons)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l keep-prefix -d 'Keep the names as stored: wrapper prefixes (module. of DDP and AveragedModel, whose n_averaged then stays a tensor; _orig_mod. of torch.compile; a Lightning module\'s attribute) are otherwise removed when every key carries them, and commands that run the model also remove a prefix that makes the names fit an architecture'
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l skip-bad -d 'Skip images that cannot be read or decoded (counted in the summary) instead of stopping'
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l exif-transpose -d 'Rotate and flip images by their EXIF orientation (torchvision\'s loader ignores it)'
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l strict-labels -d 'Refuse, instead of warning, when the class folders cannot be the model\'s classes (a different count without a map, or folders the map does not name)'
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l force -d 'Replace an existing output (atomically)'
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l nesterov -d 'Nesterov momentum (SGD)'
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l decay-all -d 'Also decay biases and one-dimensional parameters (BN\'s weight and bias)'
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l no-shuffle -d 'Keep the folder\'s order every epoch instead of a shuffle seeded by --seed'
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -l resume -d 'Continue the run saved in OUT.resume (by --save-every) with the same settings: the result equals an uninterrupted run\'s'
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -s q -l quiet -d 'Print results, warnings and errors only: no notes, no progress bars'
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ckpt -n "__fish_ckpt_using_subcommand distill" -s V -l version -d 'Print version'
complete -c ckpt -n "__fish_ckpt_using_subcommand completions" -l device -d 'Device for forward passes: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present, else the CPU)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand completions" -l threads -d 'Worker threads (default: one per core)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand completions" -l kernels -d 'Kernels of the forward passes on the CPU: fast (ckpt\'s own) or candle (candle\'s ops, the path CUDA takes; for comparisons)' -r
complete -c ckpt -n "__fish_ckpt_using_subcommand completions" -s q -l quiet -d 'Print results, warnings and errors only: no notes, no progress bars'
complete -c ckpt -n "__fish_ckpt_using_subcommand completions" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ckpt -n "__fish_ckpt_using_subcommand completions" -s V -l version -d 'Print version'
complete -c ckpt -n "__fish_ckpt_using_subcommand help; and not __fish_seen_subcommand_from inspect swa ema logits eval recal-bn sweep-res fixres soup distill completions help" -f -a "inspect" -d 'Show a checkpoint\'s format, tensors, parameter count, BatchNorm layers and provenance'
complete -c ckpt -n "__fish_ckpt_using_subcommand help; and not __fish_seen_subcommand_from inspect swa ema logits eval recal-bn sweep-res fixres soup distill completions help" -f -a "swa" -d 'Average snapshots (stochastic weight averaging), streaming, in f64'
complete -c ckpt -n "__fish_ckpt_using_subcommand help; and not __fish_seen_subcommand_from inspect swa ema logits eval recal-bn sweep-res fixres soup distill completions help" -f -a "ema" -d 'Exponential moving average over saved snapshots, several decays in one pass'
complete -c ckpt -n "__fish_ckpt_using_subcommand help; and not __fish_seen_subcommand_from inspect swa ema logits eval recal-bn sweep-res fixres soup distill completions help" -f -a "logits" -d 'Compute a model\'s logits for a batch of images'
complete -c ckpt -n "__fish_ckpt_using_subcommand help; and not __fish_seen_subcommand_from inspect swa ema logits eval recal-bn sweep-res fixres soup distill completions help" -f -a "eval" -d 'Evaluate a checkpoint on an ImageFolder: top-1, top-5, loss'
complete -c ckpt -n "__fish_ckpt_using_subcommand help; and not __fish_seen_subcommand_from inspect swa ema logits eval recal-bn sweep-res fixres soup distill completions help" -f -a "recal-bn" -d 'Recompute BatchNorm running statistics over images (precise BN)'
complete -c ckpt -n "__fish_ckpt_using_subcommand help; and not __fish_seen_subcommand_from inspect swa ema logits eval recal-bn sweep-res fixres soup distill completions help" -f -a "sweep-res" -d 'Accuracy at several test sizes (and crop fractions) in one pass over the images'
complete -c ckpt -n "__fish_ckpt_using_subcommand help; and not __fish_seen_subcommand_from inspect swa ema logits eval recal-bn sweep-res fixres soup distill completions help" -f -a "fixres" -d 'Fine-tune the classifier at the test resolution (FixRes)'
complete -c ckpt -n "__fish_ckpt_using_subcommand help; and not __fish_seen_subcommand_from inspect swa ema logits eval recal-bn sweep-res fixres soup distill completions help" -f -a "soup" -d 'Greedy model soups and best-of selection on a validation folder, BN-aware'
complete -c ckpt -n "__fish_ckpt_using_subcommand help; and not __fish_seen_subcommand_from inspect swa ema logits eval recal-bn sweep-res fixres soup distill completions help" -f -a "distill" -d 'Distil one or more teachers into a student checkpoint (knowledge distillation)'
complete -c ckpt -n "__fish_ckpt_using_subcommand help; and not __fish_seen_subcommand_from inspect swa ema logits eval recal-bn sweep-res fixres soup distill completions help" -f -a "completions" -d 'Print a shell completion script (bash, zsh or fish) to standard output'
complete -c ckpt -n "__fish_ckpt_using_subcommand help; and not __fish_seen_subcommand_from inspect swa ema logits eval recal-bn sweep-res fixres soup distill completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
