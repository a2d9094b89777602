"""Train a CIFAR-10 classifier with minidense, every step written out.

This is a short version of the trainer behind ``python -m minidense.train``
(``minidense/training/trainer.py``), in the same order and without its conveniences
(checkpoints, resuming, metrics files, plots): data, model, optimizer, schedule,
the training loop and the evaluation, with the public API only.

    python examples/train_cifar.py                          # ResNet-20, 5 epochs
    python examples/train_cifar.py --model densenet_bc100_k12 --epochs 2 --subset 5000
    python examples/train_cifar.py --data path/to/images.zip  # train/<class>/*, test/<class>/*
"""
import argparse
import time

import minidense as md


def evaluate(model, loader):
    """Test accuracy (%): eval mode (BN uses its running statistics), no graph."""
    model.eval()
    correct = seen = 0
    with md.no_grad():
        for images, labels in loader:
            predictions = model(images).argmax(1)
            correct = correct + (predictions == labels).sum()   # a device scalar: no wait
            seen += len(labels)
    return 100.0 * correct.item() / seen


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="cifar10, digits, or an image folder/.zip (default: "
                                       "find CIFAR-10, else the offline digits demo)")
    parser.add_argument("--model", default="resnet20", help="any name from md.models.list_models()")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--subset", type=int, default=0, help="train on this many images only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default="model.npz", help="where to write the trained weights")
    args = parser.parse_args()

    # 1. Data: uint8 images in memory; normalisation statistics from the training set.
    train_set, test_set = md.data.open_datasets(args.data)
    if args.subset:
        train_set = train_set.subset(args.subset)
    mean, std = md.data.channel_mean_std(train_set.images)
    device = "cuda" if md.cuda_available() else "cpu"
    # Shuffled batches with random crops (4-pixel zero padding) and flips, made on the
    # device by a background thread; the test batches are only normalised.
    train_loader = md.data.DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True,
                                      augment=True, mean=mean, std=std, device=device,
                                      seed=args.seed)
    test_loader = md.data.DataLoader(test_set, 500, mean=mean, std=std, device=device)
    print(f"{len(train_set)} training and {len(test_set)} test images, "
          f"classes {train_set.classes}, on {device}")

    # 2. The model, initialised from minidense's seeded generator.
    md.manual_seed(args.seed)
    model = md.models.get(args.model, num_classes=train_set.num_classes).to(device)
    print(f"{args.model}: {model.num_parameters():,} parameters")

    # 3. SGD with Nesterov momentum and weight decay; the learning rate follows a
    #    cosine from args.lr to 0 over every iteration of the run.
    optimizer = md.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                             weight_decay=1e-4, nesterov=True)
    scheduler = md.optim.CosineAnnealingLR(optimizer, T_max=args.epochs * len(train_loader))

    # 4. The loop: forward, loss, backward, update, schedule.
    for epoch in range(args.epochs):
        model.train()
        start = time.perf_counter()
        loss_sum = correct = seen = 0
        for images, labels in train_loader:          # each pass is a new epoch's order
            logits = model(images)                     # (batch, classes)
            loss = md.cross_entropy(logits, labels)    # mean over the batch
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()

            # Sums stay on the device; reading them every step would make the host
            # wait for the GPU and stall the batch pipeline.
            with md.no_grad():
                loss_sum = loss_sum + loss * len(labels)
                correct = correct + (logits.argmax(1) == labels).sum()
            seen += len(labels)
        train_loss, train_accuracy = loss_sum.item() / seen, 100.0 * correct.item() / seen
        elapsed = time.perf_counter() - start           # after .item(): the GPU has finished

        # 5. Evaluation on the test set after every epoch.
        test_accuracy = evaluate(model, test_loader)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}, "
              f"train accuracy {train_accuracy:.2f}%, test accuracy {test_accuracy:.2f}%, "
              f"lr {optimizer.param_groups[0]['lr']:.4f}, {seen / elapsed:.0f} images/s")

    # 6. The weights, as an .npz that md.load reads back (no pickle).
    md.save(model.state_dict(), args.save)
    print(f"weights saved to {args.save}; load them with "
          f"model.load_state_dict(md.load({args.save!r}))")


if __name__ == "__main__":
    main()
