"""A CIFAR training script in plain PyTorch, in the style of the popular community
repository's main.py: CrossEntropyLoss, SGD, CosineAnnealingLR, outputs.max(1),
predicted.eq(targets).sum().item(), a no_grad evaluation.  The data come as NumPy
arrays; the model is built by the caller."""
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim


def batches(images, labels, batch_size):
    for i in range(0, len(images), batch_size):
        yield torch.from_numpy(images[i:i + batch_size]), torch.from_numpy(labels[i:i + batch_size])


def train(net, optimizer, criterion, images, labels, batch_size):
    net.train()
    train_loss = 0
    correct = 0
    total = 0
    for batch_idx, (inputs, targets) in enumerate(batches(images, labels, batch_size)):
        optimizer.zero_grad()
        outputs = net(inputs)
        loss = criterion(outputs, targets)
        loss.backward()
        optimizer.step()

        train_loss += loss.item()
        _, predicted = outputs.max(1)
        total += targets.size(0)
        correct += predicted.eq(targets).sum().item()
    return train_loss / (batch_idx + 1), 100. * correct / total


def test(net, criterion, images, labels, batch_size):
    net.eval()
    test_loss = 0
    correct = 0
    total = 0
    with torch.no_grad():
        for batch_idx, (inputs, targets) in enumerate(batches(images, labels, batch_size)):
            outputs = net(inputs)
            loss = criterion(outputs, targets)
            test_loss += loss.item()
            _, predicted = outputs.max(1)
            total += targets.size(0)
            correct += predicted.eq(targets).sum().item()
    return test_loss / (batch_idx + 1), 100. * correct / total


def main(net, train_data, test_data, epochs=2, batch_size=4, lr=0.1):
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    history = []
    for epoch in range(epochs):
        train_loss, train_acc = train(net, optimizer, criterion, *train_data, batch_size)
        test_loss, test_acc = test(net, criterion, *test_data, batch_size)
        scheduler.step()
        history.append((train_loss, train_acc, test_loss, test_acc, scheduler.get_last_lr()[0]))
    return np.array(history)
